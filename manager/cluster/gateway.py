"""The cluster's one endpoint: places each client on a manager and steps out of the way.

A client's Hello is answered with a ``Redirect`` to the manager ``placement.place``
chose (or the error it gave; in a cluster of stages, a ``Chain`` of the stages' ranges, when no
manager holds the client's whole range: the client then says Hello once per stage); the client then talks to that manager directly, so the
gateway is never on the data path. A ``StatusRequest`` is answered with the cluster's
status. A background thread keeps a snapshot of every manager's status; each Hello also
reads the managers' liveness afresh from their actors (cheap), so that no client is sent
to a manager that has just died. Placements the snapshot does not show yet count as
pending, so that a burst of clients is spread and not piled onto one manager.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import zmq

from manager.admission import demand as estimate_demand
from manager.cluster.homes import Homes
from manager.cluster.placement import Demand, ManagerView, Placed, place
from manager.curve import CurveGate
from manager.router import drain
from menos import wire
from menos.channel import status as manager_status
from menos.messages import Chain, ClusterStatus, Error, ErrorCode, Hello, Redirect, Status, StatusRequest
from menos.quantization import Quantization

log = logging.getLogger("menos.cluster")

REFRESH_S = 1.0  # how often every manager's status is read
PENDING_S = 3.0  # a placement counts as pending until a status read this long after it
# A live actor's manager whose status read fails (slow under load) keeps its last status
# this long: one slow answer must not take it out of placement.
STALE_S = 15.0
MAX_MESSAGE_BYTES = 1 << 20  # a Hello or a StatusRequest; nothing larger comes here


@dataclass
class Snapshot:
    at: float = 0.0
    infos: list = field(default_factory=list)  # the actors' info() dicts
    statuses: dict = field(default_factory=dict)  # manager id -> Status
    read_at: dict = field(default_factory=dict)  # manager id -> when its status was read


class Gateway:
    def __init__(self, listen: str, state_dir: str, config, elem_bytes: int, infos: Callable[[], list],
                 status_keys: tuple[str, str] | None = None, max_clients: int = 64,
                 on_refresh: Callable[[], None] | None = None, quantization: str = "none",
                 stages: tuple[tuple[int, int], ...] = ()):  # fmt: skip
        """``infos``: the managers' actor info dicts, read now; ``status_keys``: (client secret,
        server public) key files with which to read the managers' status under CURVE;
        ``quantization``: the managers' (their tokens hold a dequantized weight more); ``stages``: the
        ranges of a cluster of stages (``--stages``), whichever of their managers are alive."""
        self.config, self.elem_bytes, self.infos = config, elem_bytes, infos
        self.stages = tuple(stages) if len(stages) > 1 else ()
        self.quantization = Quantization.parse(quantization)
        self.status_keys = status_keys
        self.max_clients = max_clients
        self.on_refresh = on_refresh  # called each round (the fleet keeps the managers' keys in step)
        self.homes = Homes(state_dir)  # identity -> the manager it was last placed on (its checkpoints)
        self.pending: list[tuple[float, str, Demand]] = []  # (when, manager id, demand)
        self.placed = 0
        self._snap = Snapshot()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._first = threading.Event()  # the first round of status reads is done
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.curve = CurveGate(self.ctx, self.sock, state_dir, listen)
        self.sock.bind(listen)
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._refresher = threading.Thread(target=self._refresh_loop, daemon=True, name="gateway-refresh")
        self._refresher.start()

    # ---------------------------------------------------------------- loop

    def serve(self, until: Callable[[], bool]) -> None:
        while not until():
            if self.sock.poll(200):
                drain(self.sock, self._on_message, log)
            self.curve.tick()

    def close(self) -> None:
        self._stop.set()
        self._refresher.join(5)
        self.curve.stop()
        self.sock.close(0)
        self.ctx.term()

    def _send(self, rid: bytes, msg) -> None:
        self.sock.send_multipart([rid, *wire.encode(msg)], copy=False)

    def _on_message(self, rid: bytes, frames) -> None:
        try:
            msg = wire.decode_header(frames[0].buffer).msg
        except (wire.WireError, IndexError) as exc:
            self._send(rid, Error(code=ErrorCode.BAD_MESSAGE, message=str(exc)))
            return
        if isinstance(msg, StatusRequest):
            self._send(rid, ClusterStatus(json=json.dumps(self.status())))
        elif isinstance(msg, Hello):
            self._send(rid, self.hello(msg, self.curve.user(frames[0]) or msg.identity))
        else:
            self._send(rid, Error(code=ErrorCode.BAD_MESSAGE, message=f"{type(msg).__name__} at a cluster gateway: it "
                                  "answers hello (with the manager to talk to) and status_request"))  # fmt: skip

    # ---------------------------------------------------------------- placement

    def hello(self, hello: Hello, identity: str) -> Redirect | Chain | Error:
        now = time.monotonic()
        views = self.views(self.infos(), now)
        server, home = None, identity
        if self.stages:  # a cluster of stages: each of a client's stages is placed on its own
            layers = self.config.num_hidden_layers
            server = (hello.head_layers, layers - hello.tail_layers)
            if not any(a <= server[0] < server[1] <= b for a, b in self.stages):
                return Chain(layers=layers, ranges=self.stages)
            home = f"{identity}@{server[0]}:{server[1]}" if identity else ""  # a home per stage
        try:
            _, _, m_b, standing = estimate_demand(self.config, hello, self.elem_bytes, self.quantization)
        except ValueError as exc:
            return Error(code=ErrorCode.BAD_REQUEST, message=str(exc))
        d = Demand(m_b, standing)
        verdict = place(views, d, identity, self.homes.get(home), server)
        if not isinstance(verdict, Placed):
            log.info("refused a client: %s", verdict.message)
            return Error(code=verdict.code, message=verdict.message)
        self.pending.append((now, verdict.manager, d))
        if home:
            self.homes.set(home, verdict.manager)
        self.placed += 1
        log.info("client %s -> manager %s", identity[:12] or "(anonymous)", verdict.manager)
        return Redirect(endpoint=verdict.endpoint, manager=verdict.manager)

    def views(self, infos: list, now: float) -> list[ManagerView]:
        """Each manager as placement sees it: liveness from ``infos``, memory from the latest
        status, plus the placements that status does not show yet."""
        with self._lock:
            snap = self._snap
        self.pending = [p for p in self.pending if p[0] > now - STALE_S - PENDING_S]
        views = []
        for info in infos:
            st: Status | None = snap.statuses.get(info["id"])
            read = snap.read_at.get(info["id"], float("-inf"))
            v = ManagerView(info["id"], info["endpoint"], info["alive"] and st is not None, max_clients=self.max_clients)
            if st is not None:
                v = ManagerView(v.id, v.endpoint, v.alive, st.capacity, st.standing,
                                max((c.m_b for c in st.clients), default=0), len(st.clients),
                                frozenset(c.identity for c in st.clients if c.identity), self.max_clients,
                                tuple(st.blocks))  # fmt: skip
            for when, mid, d in self.pending:
                if mid == v.id and when > read - PENDING_S:  # its status may not show it yet
                    v = v.with_pending(d)
            views.append(v)
        return views

    # ---------------------------------------------------------------- status

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.refresh()
                if self.on_refresh is not None:
                    self.on_refresh()
            except Exception:  # noqa: BLE001  a failed read is retried on the next round
                log.exception("cluster status refresh failed")
            self._first.set()
            self._stop.wait(max(0.0, REFRESH_S - (time.monotonic() - t0)))

    def wait_first_refresh(self, timeout_s: float = 30.0) -> int:
        """Block until every manager's status has been read once (a client placed before
        that finds no manager it knows to be alive); the number that answered."""
        self._first.wait(timeout_s)
        with self._lock:
            return len(self._snap.statuses)

    def refresh(self) -> Snapshot:
        at = time.monotonic()
        infos = self.infos()
        with self._lock:
            last = self._snap
        statuses, read_at = {}, {}
        for info in infos:
            mid = info["id"]
            if not info["alive"]:
                continue
            try:
                key, server = self.status_keys or (None, None)
                statuses[mid] = manager_status(info["endpoint"], timeout_s=5.0, client_key=key, server_key=server,
                                               connect_timeout_s=5.0)  # fmt: skip
                read_at[mid] = time.monotonic()
            except Exception as exc:  # noqa: BLE001  stuck or dead: the last status serves a while
                log.warning("manager %s: no status (%s)", mid, exc)
                if mid in last.statuses and at - last.read_at[mid] < STALE_S and info["endpoint"] == \
                        next((i["endpoint"] for i in last.infos if i["id"] == mid), None):  # fmt: skip
                    statuses[mid], read_at[mid] = last.statuses[mid], last.read_at[mid]
        snap = Snapshot(at, infos, statuses, read_at)
        with self._lock:
            self._snap = snap
        return snap

    def status(self) -> dict:
        """``menos-cluster status --json``: the managers and where each client is."""
        with self._lock:
            snap = self._snap
        managers, clients = [], []
        for info in snap.infos:
            st = snap.statuses.get(info["id"])
            memory = {"capacity": 0, "granted": 0, "free": 0}
            if st is not None:
                memory = {"capacity": st.capacity, "granted": st.granted, "free": st.capacity - st.standing - st.granted}
                clients += [{"identity": c.identity, "manager": info["id"]} for c in st.clients]
            managers.append({"id": info["id"], "node": info["node"], "device": info["device"],
                             "endpoint": info["endpoint"], "pid": info["pid"],
                             "alive": info["alive"] and st is not None,  # as placement sees it: up and answering
                             "clients": len(st.clients) if st is not None else 0, "memory": memory,
                             "restarts": info.get("restarts", 0),
                             "blocks": list(st.blocks) if st is not None else None})  # fmt: skip
        return {"managers": managers, "clients": clients, "placed": self.placed}
