"""`edgar-tune relay`: an alias moved in the MLflow UI, told to Prefect as `edgar-tune promote` tells it.

edgar-tune announces the aliases it moves (`edgar-tune.model.registered`, `edgar-tune.model.promoted`), and
prefect.yaml's `export-champion` deployment runs on them. A person who moves `champion` in the MLflow UI, or with
MLflow's own client, moves it without edgar-tune, and nothing ran. An MLflow tracking server (3.3+, SQL store) sends a
webhook for it, `model_version_alias.created`, but Prefect's open-source server takes no webhooks. The relay does:
it installs MLflow's webhook pointing at itself, checks each delivery's signature, and sends
`edgar-tune.model.promoted` for a version edgar-tune registered to the Prefect server in PREFECT_API_URL, recording
the move in the version's `promoted_by_hand` tag as a promotion by hand is. A move edgar-tune made itself (tagged
`edgar_tune.alias_moved`, naming the Prefect server it tells) is left to edgar-tune's own event, so one move makes one
export. The relay records on each registered model the aliases as it last saw them (`edgar_tune.relay_held`) and
compares them with the store's on starting and every `reconcile_s()`, relaying the moves no delivery told: those made
while no relay ran (MLflow gives up on a delivery after 3 retries), or lost on the way. MLflow delivers from a pool
of threads, so a move's delivery can come after the next move's: each is checked against the alias's holder now, and
a late one is not told (the delivery of the move to where the alias is tells that).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

WEBHOOK = "edgar-tune-relay"  # the MLflow webhook's name: a restarted relay updates it rather than adding another
EVENTS = ["model_version_alias.created", "model_version_alias.deleted"]  # deleted: what `before` reads next
SECRET_ENV = "EDGAR_TUNE_WEBHOOK_SECRET"
RECONCILE_ENV = "EDGAR_TUNE_RELAY_RECONCILE_S"
MAX_AGE_S = 300  # a delivery signed longer ago than this is refused (a replayed request)
OWN_MOVE_S = 600  # how long after edgar-tune moved an alias its marker stands for the webhook of that move
MAX_BODY = 1 << 20
HELD = "edgar_tune.relay_held"  # registered model tag: {"aliases": {alias: version}, "time": when the relay wrote it}


class RelayError(RuntimeError):
    """The relay cannot start: what to change."""


def signed(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's webhook signature: `v1,` and the base64 HMAC-SHA256 of `delivery_id.timestamp.body`."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def refused(secret: str, headers, body: bytes, now: float) -> str | None:
    """Why a delivery is not MLflow's (a wrong or missing signature, or an old one); None when it is."""
    delivery, stamp, signature = (headers.get(h) for h in ("X-MLflow-Delivery-Id", "X-MLflow-Timestamp",
                                                            "X-MLflow-Signature"))  # fmt: skip
    if not (delivery and stamp and signature):
        return "unsigned (X-MLflow-Signature, X-MLflow-Timestamp and X-MLflow-Delivery-Id are required)"
    if not hmac.compare_digest(signature, signed(secret, delivery, stamp, body)):
        return "its signature does not match this relay's secret"
    if not stamp.isdigit() or abs(now - int(stamp)) > MAX_AGE_S:
        return f"signed at {stamp}, more than {MAX_AGE_S} s from now"
    return None


class Relay:
    """What the relay does with one delivery: `handle(payload)` -> (HTTP status, what it did)."""

    def __init__(self, tracking_uri: str, prefect_api: str):
        import mlflow

        self.uri, self.prefect_api = tracking_uri, prefect_api
        self.client = mlflow.MlflowClient(tracking_uri)
        self.lock = threading.Lock()  # one delivery at a time: `held` is what the next one's `before` reads
        self.held: dict[tuple[str, str], str] = {}  # (model, alias) -> the version holding it, as last seen
        self.recorded: dict[str, dict] = {}  # model -> its HELD tag: what a relay saw there last
        self.theirs: set[tuple[str, str]] = set()  # (model, version): holding an alias, not registered by a run
        self._read()

    def _read(self) -> None:
        """The aliases of every registered model now (`held`), and what a relay recorded of them (`recorded`)."""
        self.held, self.recorded, token = {}, {}, None
        while True:  # in pages of 100
            page = self.client.search_registered_models(max_results=100, page_token=token)
            for model in page:
                self.held |= {(model.name, a): str(v) for a, v in model.aliases.items()}
                if HELD in model.tags and (record := _record_in(model.name, model.tags[HELD])):
                    self.recorded[model.name] = record
            if not (token := page.token):
                break

    def catch_up(self, why: str) -> list[tuple[int, str]]:
        """Relay the moves no delivery told (`why`: while no relay ran, or a delivery lost since): each registered
        model's aliases now against those recorded on it (`HELD`), then record them. A model with no record (the
        relay's first start) has none to compare: its moves are relayed from now on. Only edgar-tune's models are
        recorded (`_record`): a tracking server holds other teams' too. A move Prefect did not take stays out of
        the record, so the next catch-up tries it again. Returns (HTTP status as a delivery would get, what it
        did)."""
        said = []
        with self.lock:  # read again: a delivery may have come since, or a move that none will tell
            self._read()
            for name in sorted({n for n, _ in self.held} | set(self.recorded)):
                record, untold = self.recorded.get(name), {}
                now = {a: v for (n, a), v in self.held.items() if n == name}
                for alias, version in sorted(now.items()) if record else []:
                    before = record["aliases"].get(alias)
                    if version != before:
                        status, what = self._moved(name, alias, version, before, since=record["time"])
                        said.append((status, f"{what} ({why})"))
                        if status != 200:
                            untold[alias] = before
                self._record(name, untold)
        return said

    def _record(self, name: str, untold: dict[str, str | None] | None = None) -> None:
        """Write on registered model `name`, where it is edgar-tune's (recorded before, or a version holding one of
        its aliases was registered by a run), the aliases it holds as the relay has seen them (`HELD`), those of
        moves not told (`untold`) as they were; where they changed."""
        aliases = {a: v for (n, a), v in sorted(self.held.items()) if n == name}
        aliases = {a: v for a, v in (aliases | (untold or {})).items() if v is not None}
        if name in self.recorded and self.recorded[name]["aliases"] == aliases:
            return
        if name not in self.recorded and not any(self._registered_by_a_run(name, v) for v in set(aliases.values())):
            return
        self.recorded[name] = {"aliases": aliases, "time": time.time()}
        self.client.set_registered_model_tag(name, HELD, json.dumps(self.recorded[name]))

    def _registered_by_a_run(self, name: str, version: str) -> bool:
        """Whether a version holding an alias was registered by an edgar-tune run (it has the COMPARISON tag, which a
        registration sets before it gives an alias). Those that were not (other teams' models; MLflow's test
        delivery's example model, which does not exist) are remembered: the comparisons every `reconcile_s()` do
        not ask again."""
        import mlflow

        from tasks.registry import COMPARISON

        if (name, version) in self.theirs:
            return False
        try:
            ours = COMPARISON in self.client.get_model_version(name, version).tags
        except mlflow.exceptions.MlflowException:
            ours = False
        if not ours:
            self.theirs.add((name, version))
        return ours

    def handle(self, payload: dict) -> tuple[int, str]:
        data = payload.get("data") or {}
        event = (payload.get("entity"), payload.get("action"))
        name, alias, version = (str(data.get(k, "")) for k in ("name", "alias", "version"))
        if event not in (("model_version_alias", "created"), ("model_version_alias", "deleted")):
            return 200, f"not relayed: {event[0]}.{event[1]} is not an alias moved"
        import mlflow

        with self.lock:
            try:  # deliveries are concurrent (10 threads): one may come after the next move's
                holder = self.client.get_registered_model(name).aliases.get(alias)
            except mlflow.exceptions.MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise  # a store that did not answer: MLflow delivers it again
                return 200, f"not relayed: {name} @{alias}: {err.message}"  # MLflow's test delivery's example model
            holder = None if holder is None else str(holder)
            if event == ("model_version_alias", "created"):
                if holder != version:
                    with contextlib.suppress(mlflow.exceptions.MlflowException):  # no such version: nothing to spend
                        self._spent(name, version, alias, self.client.get_model_version(name, version).tags, None)
                    now = f"the alias is on v{holder} now" if holder else "no version holds the alias now"
                    return 200, f"not relayed: {name} v{version} @{alias}: a late delivery, {now}"
                before = self.held.get((name, alias))
                if before == version:  # set again where it was; or MLflow's retry of a delivery whose record failed
                    return 200, f"not relayed: {name} v{version} @{alias}: it held that alias already"
                status, said = self._moved(name, alias, version, before)
                if status == 200:  # else MLflow delivers it again, with the same version before
                    self.held[name, alias] = version
                    self._record(name)
                return status, said
            if holder is not None:
                return 200, f"not relayed: {name} @{alias} removed: a late delivery, the alias is on v{holder} now"
            gone = self.held.pop((name, alias), None)  # no version holds it now: nothing to export
            self._record(name)
            return 200, f"not relayed: {name} @{alias} removed (from {f'v{gone}' if gone else 'a version'})"

    def _spent(self, name: str, version: str, alias: str, tags: dict, since: float | None) -> bool:
        """Whether the move of `alias` to `version` (its `tags`) was edgar-tune's own (`_ours`); its MOVED tag is then
        deleted, spent on the delivery or comparison that told it (a late one's too): a later move back to the
        version is someone's."""
        from tasks.registry import MOVED

        if not self._ours(name, alias, json.loads(tags.get(MOVED) or "{}"), since):
            return False
        self.client.delete_model_version_tag(name, version, MOVED)
        return True

    def _moved(self, name: str, alias: str, version: str, before: str | None,
               since: float | None = None) -> tuple[int, str]:  # fmt: skip
        """Relay one move, as told by a delivery, or (`since`: when the relay last recorded the model's aliases)
        found by comparing them with that record."""
        import mlflow

        from flows.artifacts import announce_promotion
        from tasks.registry import COMPARISON, PROMOTED, hand_record, promotion_note, versions

        what = f"{name} v{version} @{alias}"
        try:
            tags = self.client.get_model_version(name, version).tags
        except mlflow.exceptions.MlflowException as err:  # MLflow's test delivery names an example model
            return 200, f"not relayed: {what}: {err.message}"
        if COMPARISON not in tags:
            return 200, f"not relayed: {what}: a version edgar-tune did not register"
        if self._spent(name, version, alias, tags, since):
            return 200, f"not relayed: {what}: moved by edgar-tune, which tells {self.prefect_api} itself"
        record = hand_record(alias, before, "the MLflow UI or API (through edgar-tune relay)", "")
        self.client.set_model_version_tag(name, version, PROMOTED, json.dumps(record))
        note = promotion_note({r["version"]: r for r in versions(self.client, name)}, version, before)
        done = {"version": version, "alias": alias, "before": before, "note": note, "record": record}
        if said := announce_promotion(name, done, self.uri):  # MLflow retries a 502
            return 502, f"not relayed: {what}: {said[1]}"
        was = f"v{before}" if before else "on no version"
        return 200, f"relayed: {what} (was {was})" + (f"; {note}" if note else "")

    def _ours(self, name: str, alias: str, moved: dict, since: float | None) -> bool:
        """Whether edgar-tune made the move to the version tagged `moved` (its MOVED tag), telling this relay's
        Prefect server itself. A delivery comes at once: the tag is fresh (`OWN_MOVE_S`). A move found by comparing
        with the record came after the relay's last record (`since`: a tag the relay saw is deleted), and no later
        move of edgar-tune's gave the alias to another version (one by hand back to this version came after it)."""
        from tasks.registry import MOVED

        if moved.get("alias") != alias or (moved.get("told") or "").rstrip("/") != self.prefect_api:
            return False
        if since is None:
            return abs(time.time() - moved.get("time", 0)) < OWN_MOVE_S
        if moved.get("time", 0) <= since:
            return False
        for other in self.client.search_model_versions(f"name = '{name}'"):
            later = json.loads(other.tags.get(MOVED) or "{}")
            if later.get("alias") == alias and later.get("time", 0) > moved["time"]:
                return False
        return True


def _record_in(name: str, tag: str) -> dict | None:
    """The relay's record in registered model `name`'s HELD tag; None, said, where it is not one (edited by hand):
    the model is then recorded afresh, and a move made meanwhile not told."""
    try:
        record = json.loads(tag)
        if isinstance(record["aliases"], dict) and isinstance(record["time"], int | float):
            return record
    except (ValueError, TypeError, KeyError):
        pass
    log.warning("registered model %s: its tag %s is not the relay's record (%r); recording it afresh", name, HELD,
                tag[:200])  # fmt: skip
    return None


def reconcile_s() -> int:
    """How often the relay compares the aliases with its record, for moves no delivery told (MLflow gives up on a
    delivery after 3 retries; a network between them may lose one): $EDGAR_TUNE_RELAY_RECONCILE_S, 300 s by
    default."""
    return int(os.environ.get(RECONCILE_ENV) or 300)


def catch_up(relay: Relay, why: str) -> None:
    """`Relay.catch_up`, its lines logged; a store or Prefect server that fails it costs a warning, and the next
    catch-up tries again."""
    try:
        for status, said in relay.catch_up(why):
            (log.info if status == 200 else log.warning)("%s", said)
    except Exception as err:  # noqa: BLE001 (the relay goes on with the moves to come)
        log.warning("comparing the aliases with the relay's record failed (%s: %s); tried again in %d s",
                    type(err).__name__, err, reconcile_s())  # fmt: skip


def install(client, url: str, secret: str) -> str:
    """Point MLflow's `edgar-tune-relay` webhook at `url` (made, or updated where a relay ran before), have MLflow
    deliver a test event, and return the webhook's ID; RelayError when MLflow cannot reach the relay."""
    import mlflow

    try:
        mine = next((w for w in client.list_webhooks() if w.name == WEBHOOK), None)
        if mine is None:
            mine = client.create_webhook(WEBHOOK, url, EVENTS, description="edgar-tune relay: aliases to Prefect",
                                         secret=secret)  # fmt: skip
        else:
            mine = client.update_webhook(mine.webhook_id, url=url, events=EVENTS, secret=secret, status="ACTIVE")
        test = client.test_webhook(mine.webhook_id)
    except mlflow.exceptions.MlflowException as err:
        raise RelayError(f"MLflow at {client.tracking_uri} refused the webhook to {url}: {err.message}. Webhooks need "
                         "an MLflow tracking server with a SQL store; MLflow delivers to https:// addresses that "
                         "resolve to public IPs unless the server runs with MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https "
                         "and MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true (a relay inside your network)") from err
    if not test.success:  # not left posting every alias moved to an address that does not answer
        client.update_webhook(mine.webhook_id, status="DISABLED")
        raise RelayError(f"MLflow at {client.tracking_uri} could not deliver to {url} "
                         f"({test.error_message or f'HTTP {test.response_status}: {test.response_body}'}): give "
                         f"--url the address the MLflow server reaches this relay at (webhook {WEBHOOK} is left "
                         "disabled)")  # fmt: skip
    return mine.webhook_id


def serve(tracking_uri: str, host: str, port: int, url: str | None) -> None:
    """Relay MLflow's alias webhooks to Prefect until stopped (SIGTERM, Ctrl-C)."""
    from tasks.limits import prefect_api

    secret = os.environ.get(SECRET_ENV, "")
    if len(secret) < 16:
        raise RelayError(f"set {SECRET_ENV} to a secret of 16 characters or more (e.g. `openssl rand -hex 32`): "
                         "MLflow signs each delivery with it, and the relay refuses the ones it did not sign")
    if not (api := prefect_api()):
        raise RelayError("set PREFECT_API_URL to the Prefect server whose automations run on edgar-tune's events "
                         "(an embedded one would stop with each event)")  # fmt: skip
    if not (os.environ.get(RECONCILE_ENV) or "300").isdigit() or reconcile_s() < 1:
        raise RelayError(f"{RECONCILE_ENV}={os.environ[RECONCILE_ENV]!r}: give the seconds between two comparisons "
                         "of the aliases with the relay's record, a whole number of 1 or more")  # fmt: skip
    if not tracking_uri.startswith(("http://", "https://")):
        raise RelayError(f"--tracking-uri {tracking_uri}: webhooks come from an MLflow tracking server "
                         "(`mlflow server`, a SQL store), not from a store read directly")  # fmt: skip
    if url and not url.startswith(("http://", "https://")):
        raise RelayError(f"--url {url}: MLflow posts its deliveries over HTTP; give http(s)://HOST:PORT/")
    import mlflow

    from tasks.io import not_answering

    # a server that is not there: a quick no, not MLflow's four minutes of retries, nor Prefect's at the first move
    for what, where, fix in (("the MLflow tracking server", tracking_uri, "--tracking-uri or $MLFLOW_TRACKING_URI"),
                             ("the Prefect server", api, "PREFECT_API_URL")):  # fmt: skip
        if gone := not_answering(where, what):
            raise RelayError(f"{gone}; start it, or give its address in {fix}")
    try:
        relay = Relay(tracking_uri, api)
    except mlflow.exceptions.MlflowException as err:
        raise RelayError(f"cannot read the registered models of {tracking_uri}: {err.message}") from err

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._answer(413, f"refused: a body of {length} bytes")
            body = self.rfile.read(length)
            if why := refused(secret, self.headers, body, time.time()):
                log.warning("refused a delivery from %s: %s", self.client_address[0], why)
                return self._answer(401, f"refused: {why}")
            try:
                payload = json.loads(body)
            except ValueError as err:
                return self._answer(400, f"refused: not JSON ({err})")
            try:
                status, said = relay.handle(payload)
            except Exception as err:  # noqa: BLE001 (MLflow delivers it again: a store that did not answer)
                log.exception("a delivery failed")
                return self._answer(500, f"failed: {type(err).__name__}: {err}")
            (log.info if status == 200 else log.warning)("%s", said)
            return self._answer(status, said)

        def _answer(self, status: int, said: str) -> None:
            out = json.dumps({"said": said}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name); the lines above say it
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as err:  # the port taken, the address not this host's
        raise RelayError(f"cannot listen on {host}:{port} ({err.strerror}); give another --listen") from None
    url = url or f"http://{host}:{server.server_port}/"
    failed: list[RelayError] = []

    def installing() -> None:  # MLflow's test delivery needs the server answering: this thread, while it serves
        try:
            install(relay.client, url, secret)
        except Exception as err:  # noqa: BLE001 (said by the main thread, once the server stops)
            failed.append(err if isinstance(err, RelayError) else
                          RelayError(f"installing MLflow's webhook failed: {type(err).__name__}: {err}"))  # fmt: skip
            server.shutdown()
            return
        catch_up(relay, "moved while no relay ran")
        log.info("relaying alias moves in %s (MLflow webhook %s -> %s) to %s as edgar-tune.model.promoted; those "
                 "no delivery tells, within %d s", tracking_uri, WEBHOOK, url, api, reconcile_s())  # fmt: skip
        while True:
            time.sleep(reconcile_s())
            catch_up(relay, "no delivery told it")

    threading.Thread(target=installing, daemon=True).start()
    try:  # in the main thread, where SIGTERM's SystemExit ends it (no handshake with another thread to wait on)
        server.serve_forever()
    finally:
        server.server_close()
    if failed:
        raise failed[0]
