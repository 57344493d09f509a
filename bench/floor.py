"""Row (b), the floor: plain Envoy 1.40 proxying HTTP/1.1 to the fake upstream.

No transcoding, no Lua, no access log: what any gateway on this machine could at best
do with the same bytes. Same binary and the same number of worker threads (one per
core, Envoy's default) as imagegw's Envoy, on its own loopback ports, hot restart off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["floor_config", "write_floor_config"]


def floor_config(*, listen_port: int, admin_port: int, upstream_port: int) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 16384,
                    },
                }
            ]
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "floor",
                    "address": {
                        "socket_address": {
                            "address": "127.0.0.1",
                            "port_value": listen_port,
                        }
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "floor",
                                        "codec_type": "AUTO",
                                        "stream_idle_timeout": "900s",
                                        "request_timeout": "0s",
                                        "route_config": {
                                            "name": "floor",
                                            "virtual_hosts": [
                                                {
                                                    "name": "fake",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {
                                                                "cluster": "fake",
                                                                "timeout": "600s",
                                                            },
                                                        }
                                                    ],
                                                }
                                            ],
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "fake",
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    "circuit_breakers": {
                        "thresholds": [
                            {
                                "priority": "DEFAULT",
                                "max_connections": 8192,
                                "max_pending_requests": 8192,
                                "max_requests": 8192,
                                "max_retries": 3,
                            }
                        ]
                    },
                    "load_assignment": {
                        "cluster_name": "fake",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": upstream_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


def write_floor_config(path: Path, *, listen_port: int, admin_port: int, upstream_port: int) -> Path:
    config = floor_config(listen_port=listen_port, admin_port=admin_port, upstream_port=upstream_port)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
