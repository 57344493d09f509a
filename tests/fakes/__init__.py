"""Fake upstream providers: real HTTP servers on loopback that speak each wire format.

Each is a ``FakeProvider`` (``tests.fakes.provider``: one handler per endpoint). Start one
from any test package::

    from tests.fakes.openai_fake import OpenAIFake

    async with OpenAIFake.running() as fake:
        ...  # point the adapter (or IMAGEGW_OPENAI_BASE_URL) at fake.base_url

or by hand: ``python -m tests.fakes.openai_fake --port 9100``. Behaviour is chosen per
request by a token in the prompt (``[[fake:moderated]]``, see ``tests.fakes.scenarios``)
or by a scripted queue (``fake.enqueue("429-ms=50", "ok")``); every request is recorded.
"""
