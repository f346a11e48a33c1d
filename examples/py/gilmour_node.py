#!/usr/bin/env python3
"""A Gilmour node in Python, with nothing but the standard library, through rylm's proxy.

It serves `<prefix>.upper` (group `py`) and listens on the slot `<prefix>.events.*`, on an HTTP
server of its own; registers both with the proxy; optionally calls another service through the
proxy; and deregisters when stdin closes or after --serve-seconds. Each event is printed on
stdout as a line, for whoever runs it:

    registered <id>
    called <topic>: <the proxy's JSON answer>
    signal <topic>: <data as JSON>
    deregistered <id>

    python3 gilmour_node.py --proxy http://127.0.0.1:8080 --prefix demo \
        --call some.service --message '21'
"""

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def compact(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def say(line):
    print(line, flush=True)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body, kind="application/json"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self.reply(200, "ok", "text/plain")
        else:
            self.reply(404, json.dumps({"error": "no such path"}))

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            call = json.loads(self.rfile.read(length) or b"null")
        except ValueError:
            self.reply(400, json.dumps({"error": "not JSON"}))
            return
        # The proxy sends {topic, sender, data, timeout}.
        if self.path == "/upper":
            data = call.get("data")
            if not isinstance(data, str):
                self.reply(422, json.dumps({"error": "upper takes a string"}))
                return
            self.reply(200, json.dumps(data.upper()))
        elif self.path == "/events":
            say("signal %s: %s" % (call.get("topic"), compact(call.get("data"))))
            self.reply(200, "")
        else:
            self.reply(404, json.dumps({"error": "no such path"}))


def proxy_call(base, method, path, body=None, token=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        # A request's code is also its HTTP status: a 4xx or 5xx still has the answer.
        return error.code, json.loads(error.read() or b"null")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", default="http://127.0.0.1:8080")
    parser.add_argument("--token", default=None)
    parser.add_argument("--prefix", default="py")
    parser.add_argument("--call", default=None, help="a service to call through the proxy")
    parser.add_argument("--message", default="null", help="its data, as JSON")
    parser.add_argument("--serve-seconds", type=float, default=None)
    args = parser.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    status, answer = proxy_call(args.proxy, "POST", "/nodes", {
        "port": port,
        "health_check": "/health",
        "services": [{"topic": args.prefix + ".upper", "group": "py", "path": "/upper", "timeout": 5}],
        "slots": [{"topic": args.prefix + ".events.*", "path": "/events", "timeout": 5}],
    }, args.token)
    if status != 200:
        say("registration refused (%d): %s" % (status, answer.get("status")))
        return 1
    node = answer["id"]
    say("registered " + node)

    if args.call:
        status, answer = proxy_call(args.proxy, "POST", "/request/" + node, {
            "topic": args.call, "message": json.loads(args.message), "timeout": 10,
        }, args.token)
        say("called %s: %s" % (args.call, compact(answer)))

    if args.serve_seconds is not None:
        time.sleep(args.serve_seconds)
    else:
        sys.stdin.read()  # until stdin closes
    proxy_call(args.proxy, "DELETE", "/nodes/" + node, None, args.token)
    say("deregistered " + node)
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
