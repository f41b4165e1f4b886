"""Leader election among control plane replicas on a coordination.k8s.io/v1 Lease, as client-go's leaderelection.

Every replica serves sidecars; the work that must happen once (the CA secret, the webhook's caBundle) is done
by the one holding the Lease. A candidate takes the Lease when it is absent, released (no holder), expired
(``renewTime + leaseDurationSeconds`` is past) or already its own; every write carries the resourceVersion it
read, so of two candidates racing for it the API server lets exactly one win (the other gets 409 Conflict).
The leader renews every ``retry_period``; when no renewal has succeeded for ``renew_deadline`` (shorter than
``lease_duration``, so it steps down before anyone else may step up) or another holder is seen, it stops
leading. ``stop()`` releases a held Lease so another replica takes over at once instead of after expiry.

``LeaderTask`` runs such work periodically while leading (started and stopped from the elector's callbacks).

Expiry compares the holder's ``renewTime`` with our clock, so it assumes the replicas' clocks agree to well
within ``lease_duration - retry_period`` (NTP on cluster nodes gives milliseconds).
"""

from __future__ import annotations

import datetime
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

__all__ = ["LeaderElector", "LeaderTask"]

log = logging.getLogger("meshproxy.control.leader")

_GROUP, _VERSION, _PLURAL = "coordination.k8s.io", "v1", "leases"
# client-go waits retryPeriod * (1 + rand * 1.2) between tries to acquire, so candidates do not move in step
_JITTER = 1.2


def _microtime(t: datetime.datetime) -> str:
    """RFC 3339 with microseconds, as metav1.MicroTime is written."""
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=datetime.UTC)


class LeaderElector:
    """Campaigns for Lease ``namespace/name`` as ``identity`` on a daemon thread between start() and stop().

    The callbacks run on that thread, ``on_started_leading`` when the Lease is won and ``on_stopped_leading``
    when leadership ends (lost, or given up by stop()); they must return promptly, as renewals wait for them.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_started_leading: Callable[[], None],
        on_stopped_leading: Callable[[], None],
    ) -> None:
        if not lease_duration > renew_deadline > retry_period > 0:
            raise ValueError("need lease_duration > renew_deadline > retry_period > 0")
        if not identity:
            raise ValueError("identity must not be empty")
        # CustomObjectsApi speaks plain dicts on any group's path: the typed V1Lease would rewrite our
        # MicroTimes as "+00:00" and hand back models where the rest of the control plane uses dicts
        self._api = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self._on_started_leading = on_started_leading
        self._on_stopped_leading = on_stopped_leading
        # the API counts whole seconds; rounding up never lets others in before we think they may
        self._lease_seconds = max(1, math.ceil(lease_duration))
        # one slow request must not eat the whole renew deadline (client-go: renewDeadline / 2)
        self._request_timeout = renew_deadline / 2
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._leading = False
        self._holder = ""  # the holder in the Lease as last read or written

    @property
    def is_leader(self) -> bool:
        return self._leading

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("LeaderElector is already started")
        self._thread = threading.Thread(target=self._run, name=f"leader-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop campaigning; if leading, release the Lease and call on_stopped_leading before returning."""
        self._stopping.set()
        # from a callback the elector's own thread finishes by itself once the callback returns
        if self._thread is not None and self._thread is not threading.current_thread():
            # at most one request in flight, then the release: both bounded by the request timeout
            self._thread.join(self.retry_period + 3 * self._request_timeout + 1.0)
            if self._thread.is_alive():
                log.warning("lease %s/%s: the elector did not stop in time", self.namespace, self.name)

    # -- the campaign -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._acquire():
                self._set_leading(True)
                self._hold()
                # the leader's work stops before the Lease is given up, so two never overlap
                self._set_leading(False)
                if self._stopping.is_set():
                    self._release()
        except Exception:
            log.exception("lease %s/%s: the elector failed", self.namespace, self.name)
            self._set_leading(False)

    def _acquire(self) -> bool:
        """Try until the Lease is ours (True) or stop() is called (False)."""
        while not self._stopping.is_set():
            if self._try_acquire_or_renew():
                log.info("lease %s/%s: acquired by %s", self.namespace, self.name, self.identity)
                return True
            self._stopping.wait(self.retry_period * (1 + random.random() * _JITTER))
        return False

    def _hold(self) -> None:
        """Renew every retry_period until stop() is called or leadership is lost."""
        deadline = time.monotonic() + self.renew_deadline
        wait = self.retry_period
        while not self._stopping.wait(wait):
            if self._try_acquire_or_renew():
                deadline = time.monotonic() + self.renew_deadline
                wait = self.retry_period
                continue
            if self._holder and self._holder != self.identity:
                log.warning("lease %s/%s: taken over by %s", self.namespace, self.name, self._holder)
                return
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "lease %s/%s: no renewal for %gs; stepping down", self.namespace, self.name, self.renew_deadline
                )
                return
            wait = min(self.retry_period, left)

    def _set_leading(self, leading: bool) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        callback = self._on_started_leading if leading else self._on_stopped_leading
        try:
            callback()
        except Exception:
            log.exception("lease %s/%s: %s raised", self.namespace, self.name, callback)

    # -- the Lease --------------------------------------------------------------------------------------

    def _try_acquire_or_renew(self) -> bool:
        now = datetime.datetime.now(datetime.UTC)
        try:
            lease = self._get()
            if lease is None:
                try:
                    self._write(None, self._spec(now, {}))
                    return True
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                # AlreadyExists: another candidate created it first; see who holds it
                lease = self._get()
                if lease is None:
                    return False
            spec = lease.get("spec") or {}
            self._holder = spec.get("holderIdentity") or ""
            if self._holder and self._holder != self.identity and not self._expired(spec, now):
                return False
            self._write(lease, self._spec(now, spec))
            return True
        except ApiException as exc:
            if exc.status == 409:
                # someone wrote the Lease since we read it: the next try reads it afresh
                log.debug("lease %s/%s: conflict; someone else wrote it", self.namespace, self.name)
            else:
                log.warning("lease %s/%s: %s %s", self.namespace, self.name, exc.status, exc.reason)
        except urllib3.exceptions.HTTPError as exc:
            log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
        return False

    def _expired(self, spec: dict[str, Any], now: datetime.datetime) -> bool:
        renewed = _parse_time(spec.get("renewTime"))
        duration = spec.get("leaseDurationSeconds")
        if renewed is None or not isinstance(duration, int):
            return True
        return renewed + datetime.timedelta(seconds=duration) < now

    def _spec(self, now: datetime.datetime, old: dict[str, Any]) -> dict[str, Any]:
        """The Lease's spec with us as the holder: renewed if we held it, taken over (a transition) if not."""
        spec = dict(old)
        if old.get("holderIdentity") != self.identity:
            spec["acquireTime"] = _microtime(now)
            spec["leaseTransitions"] = (old.get("leaseTransitions") or 0) + (1 if old else 0)
        spec["holderIdentity"] = self.identity
        spec["leaseDurationSeconds"] = self._lease_seconds
        spec["renewTime"] = _microtime(now)
        return spec

    def _release(self) -> None:
        """Clear the holder so the next candidate need not wait for expiry, as client-go's ReleaseOnCancel."""
        try:
            lease = self._get()
            spec = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != self.identity:
                return
            now = _microtime(datetime.datetime.now(datetime.UTC))
            released = spec | {"holderIdentity": None, "leaseDurationSeconds": 1, "acquireTime": now, "renewTime": now}
            self._write(lease, {k: v for k, v in released.items() if v is not None})
            log.info("lease %s/%s: released by %s", self.namespace, self.name, self.identity)
        except (ApiException, urllib3.exceptions.HTTPError) as exc:
            log.warning("lease %s/%s: not released (%s); it will expire", self.namespace, self.name, exc)

    def _get(self) -> dict[str, Any] | None:
        try:
            return self._api.get_namespaced_custom_object(
                _GROUP, _VERSION, self.namespace, _PLURAL, self.name, _request_timeout=self._request_timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _write(self, lease: dict[str, Any] | None, spec: dict[str, Any]) -> None:
        """Create the Lease (``lease`` None) or update it with the resourceVersion it was read at."""
        timeout = self._request_timeout
        if lease is None:
            body = {
                "apiVersion": f"{_GROUP}/{_VERSION}",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": spec,
            }
            self._api.create_namespaced_custom_object(
                _GROUP, _VERSION, self.namespace, _PLURAL, body, _request_timeout=timeout
            )
        else:
            body = lease | {"spec": spec}
            self._api.replace_namespaced_custom_object(
                _GROUP, _VERSION, self.namespace, _PLURAL, self.name, body, _request_timeout=timeout
            )
        self._holder = spec.get("holderIdentity") or ""


class LeaderTask:
    """Work done only by the leader: ``work()`` every ``interval`` seconds on a daemon thread between start()
    and stop() (``retry`` seconds after a failure, which is logged). Both return at once, so they may be
    called from the elector's callbacks; a round in flight when stop() is called finishes first, and as the
    work is written to be repeatable (read, then write with the resourceVersion read) an overlap with the
    next leader's first round is harmless.
    """

    def __init__(self, name: str, work: Callable[[], object], *, interval: float = 30.0, retry: float = 2.0) -> None:
        if not interval > 0 or not retry > 0:
            raise ValueError("interval and retry must be positive")
        self.name = name
        self.interval = interval
        self.retry = retry
        self._work = work
        self._lock = threading.Lock()
        self._stop: threading.Event | None = None

    @property
    def running(self) -> bool:
        with self._lock:
            return self._stop is not None and not self._stop.is_set()

    def start(self) -> None:
        with self._lock:
            if self._stop is not None and not self._stop.is_set():
                return
            # each run has its own event: a thread still finishing its last round stays stopped
            stop = self._stop = threading.Event()
        threading.Thread(target=self._run, args=(stop,), name=f"leader-task-{self.name}", daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            if self._stop is not None:
                self._stop.set()

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._work()
                wait = self.interval
            except (ApiException, urllib3.exceptions.HTTPError) as exc:
                log.warning("leader task %s: %s", self.name, getattr(exc, "reason", None) or exc)
                wait = self.retry
            except Exception:
                log.exception("leader task %s failed", self.name)
                wait = self.retry
            stop.wait(wait)
