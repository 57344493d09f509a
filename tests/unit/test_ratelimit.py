"""Rate-limit window math and response headers (pure functions)."""

from __future__ import annotations

import pytest

from server.ratelimit import Limits, Quota, format_reset, requested_images, reset_seconds, window_start


@pytest.mark.parametrize(
    ("now", "start"),
    [
        (1_700_000_000.0, 1_699_999_980),  # 20 s into a window
        (1_699_999_980.0, 1_699_999_980),  # exactly at its start
        (1_700_000_039.999, 1_699_999_980),  # the last instant of it
        (1_700_000_040.0, 1_700_000_040),  # the next one
    ],
)
def test_windows_start_at_whole_unix_minutes(now: float, start: int) -> None:
    assert window_start(now) == start


@pytest.mark.parametrize(
    ("now", "seconds"),
    [
        (1_699_999_980.0, 60),  # a whole window left
        (1_699_999_980.2, 60),  # 59.8 s rounds up
        (1_700_000_027.2, 13),  # 12.8 s rounds up
        (1_700_000_039.999, 1),  # never 0: Retry-After 0 would mean "now"
        (1_699_999_900.0, 60),  # a window another replica opened ahead of this clock
    ],
)
def test_reset_is_whole_seconds_until_the_window_ends(now: float, seconds: int) -> None:
    assert reset_seconds(1_699_999_980, now) == seconds


@pytest.mark.parametrize(("seconds", "text"), [(1, "1s"), (12, "12s"), (59, "59s"), (60, "1m0s"), (75, "1m15s")])
def test_reset_is_written_like_openai(seconds: int, text: str) -> None:
    assert format_reset(seconds) == text


@pytest.mark.parametrize(("n", "counted"), [(None, 1), (1, 1), (4, 4), (10, 10), (0, 1), (-3, 1), (50, 10)])
def test_a_request_counts_its_n_within_1_to_10(n: int | None, counted: int) -> None:
    assert requested_images(n) == counted


def test_headers_report_both_limits() -> None:
    quota = Quota(Limits(requests_per_minute=5, images_per_minute=20), requests_used=2, images_used=8, reset_seconds=12)
    assert quota.headers() == (
        ("x-ratelimit-limit-requests", "5"),
        ("x-ratelimit-remaining-requests", "3"),
        ("x-ratelimit-reset-requests", "12s"),
        ("x-ratelimit-limit-images", "20"),
        ("x-ratelimit-remaining-images", "12"),
        ("x-ratelimit-reset-images", "12s"),
    )


def test_an_unlimited_dimension_has_no_headers_and_remaining_is_never_negative() -> None:
    quota = Quota(Limits(requests_per_minute=0, images_per_minute=4), requests_used=9, images_used=6, reset_seconds=60)
    assert quota.headers() == (
        ("x-ratelimit-limit-images", "4"),
        ("x-ratelimit-remaining-images", "0"),
        ("x-ratelimit-reset-images", "1m0s"),
    )
    assert Limits(0, 0).unlimited and not Limits(0, 1).unlimited and not Limits(1, 0).unlimited
