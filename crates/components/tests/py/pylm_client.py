"""Runs a real pylm 0.14 Client against a server and prints what it got, as JSON.

    python pylm_client.py SERVER_NAME DB_ADDRESS

The caller (a rylm test) checks the printed results; this script only exercises the client.
"""
import json
import sys

from pylm.clients import Client

name, db_address = sys.argv[1], sys.argv[2]
client = Client(name, db_address)  # fetches pub and pull addresses from the cache; waits 0.5 s
out = {}
out["eval"] = client.eval(name + ".upper", b"hello from pylm").decode()
out["job"] = sorted(r.decode() for r in client.job(name + ".reverse", (str(i).encode() * 2 for i in range(10)), messages=10))
out["fail"] = client.eval(name + ".fail", b"x").decode()
key = client.set(b"a value", "a-key")
out["set"] = key
out["get"] = client.get("a-key").decode()
out["delete"] = client.delete("a-key")
out["missing"] = client.get("a-key").decode()
out["new_key"] = len(client.set(b"anonymous"))
# Back-to-back calls, each on a new SUB and a new PUSH, the case a publisher must not get wrong.
out["evals"] = [client.eval(name + ".upper", b"call %d" % i).decode() for i in range(30)]
print(json.dumps(out))
