"""Hosts the UI runs in. Only the protocol is exported here; the web-UI adapters (the only modules that import
`modules.*`) are imported by the extension's `scripts/`, the standalone one by `lib_lora.app` and the CLI."""
from lib_lora.host.base import Host, HostResult, ModelInfo, ProgressFn, StopFn

__all__ = ["Host", "HostResult", "ModelInfo", "ProgressFn", "StopFn"]
