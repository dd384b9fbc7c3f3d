"""The local front door: forwards by the verified placement's weights, follows a new placement
without a restart, and tries another placed cloud when one answers 5xx or refuses, so the caller
sees no error while any placed cloud is up."""
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from skyfuse import contracts
from skyfuse.bus import open_bus
from skyfuse.dev.router import Placement, Router, RouterServer
from tests.conftest import keyed_fleet, signed_event


def backend(status: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            body = json.dumps({"status": status, "key": self.headers.get("x-api-key")}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def fleet(tmp_path):
    return keyed_fleet(tmp_path)


def place(bus, fleet, sequence, weights, by="aws/scheduler"):
    from skyfuse import events

    data = {**contracts.sample("placement.changed"), "sequence": sequence, "decision_id": f"d-{sequence}",
            "placements": [{"cloud": c, "weight": w, "replicas": 1} for c, w in weights.items()]}
    key, value, headers = events.encode(signed_event("placement.changed", data, by, fleet))
    bus.publish(contracts.event_type("placement.changed").topic, value, key, headers)


def post(url, key="k1"):
    request = urllib.request.Request(f"{url}/predict", b'{"instances": [[1, 2]]}',
                                     {"content-type": "application/json", "x-api-key": key})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["x-skyfuse-cloud"], json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["x-skyfuse-cloud"] or "", json.loads(exc.read())


def test_routes_by_placement_follows_it_and_fails_over(fleet):
    bus = open_bus(fleet)
    failing, failing_url = backend(500)
    good, good_url = backend(200)
    placement = Placement(fleet, bus)
    server = RouterServer(Router({"aws": failing_url, "gcp": good_url}, placement, seed=1), 0, poll_s=0.05).start()
    try:
        place(bus, fleet, 1, {"aws": 0.5, "gcp": 0.5})
        place(bus, fleet, 9, {"aws": 1.0}, by="gcp/inference")  # forged: not the control scheduler
        placement.refresh()
        assert placement.sequence == 1 and placement.weights == {"aws": 0.5, "gcp": 0.5}
        answers = [post(server.url) for _ in range(20)]
        assert {(status, cloud) for status, cloud, _ in answers} == {(200, "gcp")}  # aws's 500s never show
        assert all(body["key"] == "k1" for _, _, body in answers)  # the API key goes through
        stats = json.loads(urllib.request.urlopen(f"{server.url}/router", timeout=10).read())
        assert stats["counts"]["gcp"]["answered"] == 20 and stats["counts"]["aws"]["5xx"] >= 1
        place(bus, fleet, 2, {"aws": 1.0})  # a new placement, followed without a restart
        placement.refresh()
        assert placement.weights == {"aws": 1.0}
        status, cloud, body = post(server.url)  # the only placed cloud fails: its answer is what a caller sees
        assert (status, cloud, body["status"]) == (500, "aws", 500)
        place(bus, fleet, 3, {"gcp": 1.0})
        placement.refresh()
        good.shutdown(), good.server_close()  # and now gcp is down as well
        status, _, body = post(server.url)
        assert status == 503 and body["detail"]["code"] == "no_cloud" and "gcp: ConnectionRefusedError" in body["error"]
    finally:
        server.stop()
        failing.shutdown()
        bus.close()


def test_keeps_answering_while_the_serving_clouds_server_is_killed(fleet, tmp_path):
    """Real inference servers (aws and azure entry points) behind the router; the heavier placed
    cloud's server is SIGKILLed while requests stream in: every request still gets a 200."""
    import signal
    import time

    from skyfuse.dev import hosts
    from skyfuse.serving import testing
    from skyfuse.serving.model import publish
    from skyfuse.storage import open_store
    from tests.integration.test_inference_hosts import host_env

    servers = {}
    try:
        for cloud in ("aws", "azure"):
            (tmp_path / cloud).mkdir()
            store_uri, env = host_env(cloud, tmp_path / cloud)
            servers[cloud] = hosts.start(cloud, env=env, log_dir=tmp_path / cloud)
            publish(open_store(store_uri), "v1", testing.classifier(seed=1))
        bus = open_bus(fleet)
        placement = Placement(fleet, bus)
        router = RouterServer(Router({c: s.url for c, s in servers.items()}, placement, seed=3), 0, poll_s=0.05).start()
        place(bus, fleet, 1, {"aws": 0.8, "azure": 0.2})
        placement.refresh()
        body = b'{"instances": [[1, 2, 3, 4]]}'

        def ask():
            request = urllib.request.Request(f"{router.url}/predict", body, {"content-type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, response.headers["x-skyfuse-cloud"]
            except urllib.error.HTTPError as exc:
                return exc.code, exc.headers["x-skyfuse-cloud"]

        deadline = time.monotonic() + 30
        answers = []
        while {c for _, c in answers} != {"aws", "azure"} or any(s != 200 for s, _ in answers):
            assert time.monotonic() < deadline, f"both servers not answering 200 through the router: {answers[-5:]}"
            answers = [*answers[-20:], ask()]
        servers["aws"].process.send_signal(signal.SIGKILL)  # the leader; its group goes below
        servers["aws"]._signal(signal.SIGKILL)
        servers["aws"].process.wait(10)
        after = [ask() for _ in range(40)]
        assert after == [(200, "azure")] * 40
        stats = json.loads(urllib.request.urlopen(f"{router.url}/router", timeout=10).read())
        assert stats["counts"]["aws"]["refused"] >= 1, stats  # aws was drawn, refused, and azure answered instead
        router.stop()
        bus.close()
    finally:
        for server in servers.values():
            server.stop()
