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
from skyfuse.serving.router import Placement, Router, RouterServer
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
