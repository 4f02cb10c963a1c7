"""The cluster history run's snapshot and trim faults, and the tally of what snapshots did in a run.

The shard servers of the run snapshot on their own schedule all along (a small
``BRAID_SNAPSHOT_LOG_BYTES``: tests/history/cluster.py), trimming each shard's subject below
the older of its two newest snapshots; these faults add, one at a time like the others:

* ``snapshot_now``: the ``Snapshot`` RPC on a random live replica of a random shard: a
  snapshot and a trim at a moment the schedule did not choose, racing replicas that are
  catching up after an earlier fault; two times in three with the shard's other replica
  paused or killed meanwhile, and two snapshots, so the trim passes its position;
* ``kill_mid_snapshot``: the ``Snapshot`` RPC, and a kill -9 of that shard server at a random
  delay inside the call (drawn below the last call's duration: in the checkpoint, the upload
  or the read-back), then a restart;
* ``wiped_disk``: kill -9 of a shard server, its data directory removed, a restart: its
  replicas bootstrap from the newest valid snapshot and the log tail after it;
* ``flipped_then_wiped``: a wiped disk of the server that took a shard's newest snapshot,
  and while it is down that snapshot overwritten with a copy with a random byte of a random
  file flipped (clusterkit's ``damage_object_file``): its bootstrap must skip it for the older
  one. The shard's other replicas are paused until it has bootstrapped, so none takes a newer
  snapshot first. Only when the shard has two snapshots and neither was flipped before: two
  damaged snapshots and a trimmed log are a loss no design survives.

Each fault draws once from the injector's generator and the rest from its own, so a seed
draws the same faults whatever the cluster answers. ``tally`` counts, from the shard servers'
log lines, the snapshots, trims, bootstraps and skipped snapshots of the run, and what each
replica last restored (Status.restored_from), so a run that never trimmed shows it;
``problems`` is what no run may show: a flipped snapshot restored after it was flipped.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import time
from collections.abc import Callable

import grpc

from braid.cluster.v1 import shard_pb2 as spb
from braid.cluster.v1 import shard_pb2_grpc
from braid.service.cluster.local import Child, LocalCluster
from braid.service.cluster.snapshot_objects import SnapshotObjects

from ..clusterkit import cluster_link, damage_object_file
from . import faults as f
from .checker import Fault
from .workload import COLLECTION

SNAPSHOT_S = 60.0  # a Snapshot call's deadline (a loaded 2-core machine, a NATS node just back)
BOOTSTRAP_S = 30.0  # a wiped replica of a small shard restores and replays within this
STATUS_S = 5.0

# The shard servers' log lines (service/cluster/replica.py, snapshot_objects.py) counted in the notes.
LINES = {
    "snapshots": re.compile(r": snapshot (auto/\S+) \("),
    "trims": re.compile(r": log trimmed below sequence \d+"),
    "bootstraps": re.compile(r" restored snapshot (auto/\S+)"),
    "skipped": re.compile(r": snapshot (auto/\S+) skipped"),
    "behind a trim": re.compile(r": the log was trimmed below sequence \d+ while this replica"),
    "no valid snapshot": re.compile(r"no valid snapshot"),
    "failed scheduled snapshots": re.compile(r": snapshot failed: "),
}


class SnapshotFaults:
    """The snapshot faults on ``cluster``'s shard servers; ``start(child)`` restarts one and waits."""

    def __init__(self, cluster: LocalCluster, start: Callable[[Child], None]) -> None:
        self.cluster = cluster
        self.start = start
        self.snapshot_s = 0.5  # the last Snapshot call that answered took this long
        self.flipped: list[str] = []
        self._flipped_at: dict[str, dict[str, int]] = {}  # flipped object -> each shard server's output length then
        self.wipes = 0
        self.kills = {"mid-call": 0, "after the answer": 0}

    def menu(self, kill_hold: tuple[float, float]) -> list[tuple[float, f.FaultFn]]:
        return [
            (2.0, self._own(self.snapshot_now)),
            (1.5, self._own(lambda rng: self.kill_mid_snapshot(rng, kill_hold))),
            (1.5, self._own(lambda rng: self.wiped_disk(rng, kill_hold))),
            (1.0, self._own(lambda rng: self.flipped_then_wiped(rng, kill_hold))),
        ]

    @staticmethod
    def _own(fault: f.FaultFn) -> f.FaultFn:
        """One draw of the injector's generator seeds the fault's own (what it draws then depends
        on what the cluster answers: which servers hold a shard, how many snapshots it has)."""
        return lambda rng: fault(random.Random(rng.random()))

    # ------------------------------------------------------------- the cluster as it is now

    def _replicas(self) -> list[tuple[Child, spb.ReplicaStatus]]:
        """(server, status) of every replica of the collection that a live shard server reports."""
        found = []
        for child in self.cluster.shards:
            if not child.alive or not child.port:
                continue
            try:
                with grpc.insecure_channel(self.cluster.address_of(child)) as channel:
                    response = shard_pb2_grpc.ShardStub(channel).Status(spb.StatusRequest(), timeout=STATUS_S)
            except grpc.RpcError:
                continue  # restarting: not a candidate this time
            found += [(child, r) for r in response.replicas if r.replica.collection == COLLECTION]
        return found

    def _pick(self, rng: random.Random) -> tuple[Child, spb.ReplicaStatus] | None:
        """A random live replica of a random shard (None when no server answers)."""
        replicas = sorted(self._replicas(), key=lambda item: (item[1].replica.shard, item[0].name))
        if not replicas:
            return None
        shard = rng.choice(sorted({r.replica.shard for _, r in replicas}))
        return rng.choice([(child, r) for child, r in replicas if r.replica.shard == shard])

    # ------------------------------------------------------------- faults

    def snapshot_now(self, rng: random.Random) -> Fault:
        """A Snapshot call on a random live replica of a random shard; or, two times in three, the
        shard's other replica paused (SIGSTOP) or killed first and two snapshots taken a moment
        apart, so the trim below the older of them passes that replica's position, then it is
        continued or restarted: it must see the trim and bootstrap, not skip the trimmed records."""
        began = time.monotonic()
        picked = self._pick(rng)
        if picked is None:
            return Fault("snapshot + trim now", "no replica", began, time.monotonic(), "no shard server answered")
        child, status = picked
        shard = status.replica.shard
        others = sorted({c.name: c for c, r in self._replicas() if r.replica.shard == shard and c is not child}.items())
        how = rng.choice(("alone", "paused", "killed"))
        other = rng.choice(others)[1] if others and how != "alone" else None
        between = rng.uniform(0.3, 1.0)
        target = f"shard {shard} on {child.name}"
        notes = []
        if other is None:
            how = "alone"
        elif how == "paused" and other.proc is not None:
            other.proc.send_signal(signal.SIGSTOP)
        else:
            other.kill()
        try:
            for number in range(1 if other is None else 2):
                if number:
                    time.sleep(between)  # writes land between the two: the second trim passes the stopped replica
                taken = self._snapshot(child, status.replica)
                notes.append(taken)
                if taken.startswith("refused"):
                    break
        finally:
            if other is not None and how == "paused" and other.proc is not None:
                other.proc.send_signal(signal.SIGCONT)
            elif other is not None:
                self.start(other)
        if other is not None:
            target += f", past {other.name}'s replica {how}"
        return Fault("snapshot + trim now", target, began, time.monotonic(), "; ".join(notes))

    def _snapshot(self, child: Child, replica: spb.ReplicaRef) -> str:
        """A Snapshot call to ``child``'s ``replica``; what it answered."""
        called = time.monotonic()
        try:
            with grpc.insecure_channel(self.cluster.address_of(child)) as channel:
                stub = shard_pb2_grpc.ShardStub(channel)
                taken = stub.Snapshot(spb.SnapshotRequest(replica=replica), timeout=SNAPSHOT_S)
        except grpc.RpcError as err:  # a replica catching up refuses: the fault still happened (no snapshot)
            return f"refused: {err.code().name} {(err.details() or '')[:120]}"
        self.snapshot_s = time.monotonic() - called
        return f"{taken.object}, {taken.bytes} bytes, {self.snapshot_s:.2f} s"

    def kill_mid_snapshot(self, rng: random.Random, hold_s: tuple[float, float]) -> Fault:
        began = time.monotonic()
        picked = self._pick(rng)
        if picked is None:
            return Fault("kill -9 mid-snapshot", "no replica", began, time.monotonic(), "no shard server answered")
        child, status = picked
        delay = rng.uniform(0.0, 0.9 * self.snapshot_s)
        hold = rng.uniform(*hold_s)
        channel = grpc.insecure_channel(self.cluster.address_of(child))
        try:
            call = shard_pb2_grpc.ShardStub(channel).Snapshot.future(
                spb.SnapshotRequest(replica=status.replica), timeout=SNAPSHOT_S
            )
            called = time.monotonic()
            while time.monotonic() - called < delay and not call.done():
                time.sleep(0.002)
            answered = call.done()
            child.kill()
            if answered and call.exception() is None:
                self.snapshot_s = time.monotonic() - called
        finally:
            channel.close()
        when = "after the answer" if answered else "mid-call"
        self.kills[when] += 1
        time.sleep(hold)
        restarted = time.monotonic()
        self.start(child)
        note = (
            f"shard {status.replica.shard}: killed {delay:.2f} s into the call ({when}), down {hold:.1f} s, "
            f"restart {time.monotonic() - restarted:.1f} s"
        )
        return Fault("kill -9 mid-snapshot", child.name, began, time.monotonic(), note)

    def wiped_disk(self, rng: random.Random, hold_s: tuple[float, float]) -> Fault:
        began = time.monotonic()
        child = rng.choice(self.cluster.shards)
        note = self._wipe(child, rng.uniform(*hold_s))
        return Fault("wiped disk", child.name, began, time.monotonic(), note)

    def _wipe(self, child: Child, hold: float, while_down: Callable[[], str] = lambda: "") -> str:
        """kill -9 ``child``, remove its data directory, ``while_down()``, hold, restart; the note."""
        child.kill()
        data = self.cluster.directory / child.name
        shutil.rmtree(data, ignore_errors=True)
        self.wipes += 1
        done = while_down()
        time.sleep(hold)
        restarted = time.monotonic()
        self.start(child)
        note = f"{data.name}/ removed, down {hold:.1f} s, restart {time.monotonic() - restarted:.1f} s"
        return f"{done}; {note}" if done else note

    def flipped_then_wiped(self, rng: random.Random, hold_s: tuple[float, float]) -> Fault:
        """The server that took the shard's newest snapshot is wiped, the snapshot flipped while it
        is down, and it restarts at once, while the shard's other replicas are paused (SIGSTOP)
        until its replica of the shard has bootstrapped (or BOOTSTRAP_S passed): none of them can
        take a newer snapshot first, so the bootstrap meets the flipped one as the newest."""
        began = time.monotonic()
        picked = self._pick(rng)
        if picked is None:
            child = rng.choice(self.cluster.shards)
            note = self._wipe(child, rng.uniform(*hold_s))
            return Fault("flipped snapshot, wiped disk", child.name, began, time.monotonic(), "no replica; " + note)
        child, status = picked
        uid, shard = status.replica.uid, status.replica.shard
        holders = [c for c, r in self._replicas() if r.replica.shard == shard] or [child]
        newest = self._newest(uid, shard)
        taker = next((c for c in holders if newest and any(newest in line for line in c.output)), child)
        others = [c for c in holders if c is not taker and c.alive and c.proc is not None]
        mark = len(taker.output)
        for other in others:
            other.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            note = self._wipe(taker, 0.0, lambda: self._flip(uid, shard, rng))
            note += "; " + self._bootstrapped(taker, mark, shard)
        finally:
            for other in others:
                other.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        paused = f", {', '.join(o.name for o in others)} paused meanwhile" if others else ""
        target = f"shard {shard}, {taker.name}{paused}"
        return Fault("flipped snapshot, wiped disk", target, began, time.monotonic(), note)

    @staticmethod
    def _bootstrapped(child: Child, mark: int, shard: int) -> str:
        """Until ``child``'s replica of ``shard`` opens after output line ``mark`` (at most
        BOOTSTRAP_S); what its bootstrap said (snapshots skipped, restored)."""
        what = re.compile(rf"replica {COLLECTION}/{shard}:? (restored snapshot \S+|snapshot \S+ skipped|open at)")
        deadline = time.monotonic() + BOOTSTRAP_S
        said: list[str] = []
        while time.monotonic() < deadline:
            said = [found.group(1) for line in child.output[mark:] if (found := what.search(line))]
            if any(line.startswith("open at") for line in said):
                break
            time.sleep(0.1)
        else:
            said.append(f"not open {BOOTSTRAP_S:.0f} s after the restart")
        return "bootstrap: " + ", ".join(said)

    def _newest(self, uid: str, shard: int) -> str | None:
        try:
            with cluster_link(self.cluster) as link:
                found = SnapshotObjects(link, 1).replica_snapshots(uid, shard)
            return found[-1].name if found else None
        except Exception:  # NATS settling after an earlier fault: any holder will do
            return None

    def _flip(self, uid: str, shard: int, rng: random.Random) -> str:
        """Flip a random byte of a random file of the shard's newest snapshot if its predecessor is
        intact; what was done."""
        try:
            with cluster_link(self.cluster) as link:
                found = SnapshotObjects(link, 1).replica_snapshots(uid, shard)
                if len(found) < 2 or {found[-1].name, found[-2].name} & set(self.flipped):
                    names = [obj.name.rsplit("/", 1)[-1].lstrip("0") for obj in found]
                    return f"not flipped: snapshots at {names or 'none'}, flipped before: {len(self.flipped)}"
                member = damage_object_file(link, found[-1].name, rng)
                self.flipped.append(found[-1].name)
                self._flipped_at[found[-1].name] = {c.name: len(c.output) for c in self.cluster.shards}
                return f"flipped a byte of {member} in {found[-1].name} (the one before: {found[-2].name})"
        except Exception as err:  # NATS settling after an earlier fault: no flip this time
            return f"not flipped: {err!r}"[:200]

    # ------------------------------------------------------------- the tally

    def tally(self, statuses: dict[str, list[spb.ReplicaStatus]]) -> tuple[dict[str, int], list[str], list[str]]:
        """(counts, notes, problems) after healing: what snapshots did in the run, from the shard
        servers' output (counts of LINES) and ``statuses`` (each server's replicas), and the trim
        points in NATS."""
        output = "".join(line for child in self.cluster.shards for line in child.output)
        counts = {what: len(pattern.findall(output)) for what, pattern in LINES.items()}
        counts["wiped disks"], counts["flipped"] = self.wipes, len(self.flipped)
        counts["kills mid-call"] = self.kills["mid-call"]
        notes = ["snapshots: " + ", ".join(f"{what} {n}" for what, n in counts.items() if what in LINES)]
        notes.append(
            f"snapshot faults: {self.wipes} wiped disks, kills in a Snapshot call {self.kills}, "
            f"flipped {self.flipped or 'none'}"
        )
        restored = {
            f"{name}/{r.replica.shard}": r.restored_from.rsplit("/", 1)[-1].lstrip("0") or "-"
            for name, replicas in sorted(statuses.items())
            for r in replicas
        }
        notes.append(f"restored_from (snapshot sequence, - none since the server started): {restored}")
        uids = {r.replica.uid for replicas in statuses.values() for r in replicas}
        try:
            with cluster_link(self.cluster) as link:
                objects = SnapshotObjects(link, 1)
                shards = sorted({r.replica.shard for replicas in statuses.values() for r in replicas})
                points = {n: objects.trim_point(uid, n) for uid in uids for n in shards}
            notes.append(f"trim points at the end (shard: first sequence kept): {points}")
        except Exception as err:
            notes.append(f"trim points not read: {err!r}")
        problems = []
        for name in self.flipped:  # restored before the flip is fine: only the lines since count
            since = "".join(
                "".join(child.output[self._flipped_at[name][child.name] :]) for child in self.cluster.shards
            )
            skipped = f"snapshot {name} skipped" in since
            notes.append(f"flipped {name}: {'skipped by a bootstrap' if skipped else 'no bootstrap met it'}")
            if f"restored snapshot {name}" in since:
                problems.append(f"the byte-flipped snapshot {name} was restored")
        return counts, notes, problems
