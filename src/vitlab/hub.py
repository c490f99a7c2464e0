"""Hugging Face hub access that fails fast without network.

`huggingface_hub` retries and waits on every request; with no route it took 23.5 s to fail here,
and behind a proxy that accepts connections and never answers it hung for over 400 s. Before a
hub id is loaded, `use_hub` asks the endpoint once (PROBE_SECONDS); if it does not answer, the
hub library is switched to offline mode, so the load is served from the local cache or fails
at once with an error that names the model and the offline way (a local folder or file).
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from pathlib import Path

from vitlab.errors import ConfigError

log = logging.getLogger(__name__)
PROBE_SECONDS = 5.0
_reachable: dict[str, bool] = {}


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Does the configured hub endpoint (HF_ENDPOINT; proxies from the environment) answer an
    HTTP request within `timeout` seconds? Asked once per process and endpoint."""
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    if endpoint not in _reachable:
        try:
            request = urllib.request.Request(endpoint, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout):
                pass
            _reachable[endpoint] = True
        except urllib.error.HTTPError:
            _reachable[endpoint] = True  # it answered, even if with an error status
        except (OSError, ValueError):  # URLError, timeouts, refused, no route, bad URL
            _reachable[endpoint] = False
    return _reachable[endpoint]


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def use_hub(model_id: str) -> None:
    """Call before loading `model_id` with transformers/timm: a local path needs nothing; for a
    hub id, an unreachable hub switches huggingface_hub to offline mode (local cache only)."""
    from huggingface_hub import constants

    if Path(str(model_id)).expanduser().exists() or constants.HF_HUB_OFFLINE:
        return
    if not hub_reachable():
        log.warning(
            "the Hugging Face hub (%s) did not answer within %.0f s: loading %s from the local "
            "cache only (HF_HUB_OFFLINE)",
            constants.ENDPOINT,
            PROBE_SECONDS,
            model_id,
        )
        constants.HF_HUB_OFFLINE = True


def hub_load_error(model_id: str, key: str, offline_way: str, err: BaseException) -> ConfigError:
    """The error for a hub model that could not be loaded: which one, why, what to do offline."""
    why = (
        "the hub is offline or unreachable and it is not in the local cache"
        if hub_offline()
        else str(err)
    )
    return ConfigError(
        f"{key}={model_id}: could not load it from the Hugging Face hub ({why}). Without "
        f"network: download it on a connected machine and set {offline_way}"
    )
