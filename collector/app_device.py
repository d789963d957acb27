"""Device facts for app events, from what the app declares rather than its HTTP client.

An app's User-Agent names its HTTP stack (``okhttp/4.9``, ``CFNetwork``), which the web
rules classify as a script or bot; the OS, OS version and device model the app declares
are the truthful description of "the program that displays the ad" (3.3 item 3). The
model is resolved to family and brand by the same uap-core rules the pixel uses, fed a
synthetic user agent, so ``SM-G991B`` becomes Samsung like it would in a browser.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol


class _Parsed(Protocol):
    @property
    def device_family(self) -> str: ...

    @property
    def device_brand(self) -> str: ...


class AppDevice(NamedTuple):
    os_family: str
    os_version: str
    device_family: str
    device_brand: str
    device_class: str  # mobile or tablet


_OS_NAMES = {"ios": "iOS", "ipados": "iOS", "android": "Android", "harmonyos": "HarmonyOS"}


def app_device(
    parse: Callable[[str], _Parsed], os_name: str, os_version: str, model: str
) -> AppDevice:
    os_family = _OS_NAMES.get(os_name.lower(), os_name) if os_name else "Other"
    family, brand = model or "Other", ""
    if model and os_family == "iOS":
        parsed = parse(f"Mozilla/5.0 ({model}; CPU iPhone OS {os_version.replace('.', '_')})")
        family, brand = parsed.device_family, parsed.device_brand or "Apple"
    elif model and os_family == "Android":
        parsed = parse(f"Mozilla/5.0 (Linux; Android {os_version}; {model})")
        family, brand = parsed.device_family, parsed.device_brand
    tablet = model.startswith("iPad") or os_name.lower() == "ipados"
    return AppDevice(os_family, os_version, family, brand, "tablet" if tablet else "mobile")
