"""Each identity's home: the manager it was last placed on, where its checkpoints are.

Kept in the cluster's state dir (``homes.json``, written atomically on each change), so
a restarted gateway still sends a returning client to its checkpoints rather than to
whichever manager is least loaded (where ``resume=True`` would find nothing)."""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger("menos.cluster")

FILENAME = "homes.json"


class Homes:
    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, FILENAME)
        self._homes = self._read()

    def _read(self) -> dict[str, str]:
        try:
            with open(self.path) as f:
                homes = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s unreadable (%s): every identity starts without a home", self.path, exc)
            return {}
        if not isinstance(homes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in homes.items()):
            log.warning("%s is not a map of identity to manager: every identity starts without a home", self.path)
            return {}
        return homes

    def get(self, identity: str) -> str | None:
        return self._homes.get(identity)

    def set(self, identity: str, manager: str) -> None:
        if self._homes.get(identity) == manager:
            return
        self._homes[identity] = manager
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self._homes, f)
        os.replace(tmp, self.path)

    def __len__(self) -> int:
        return len(self._homes)
