"""Runs a real pylm 0.14 Client against a master whose hooks reshape its messages, and prints
what it got, as JSON.

    python pylm_hooks_client.py SERVER_NAME DB_ADDRESS

The master's hooks (set by the rylm test that runs this): `scatter` drops a message `drop`,
sends a message `twice` on as two, and panics on `boom`; `gather` appends `!` to each result.
"""
import json
import sys

from pylm.clients import Client

name, db_address = sys.argv[1], sys.argv[2]
client = Client(name, db_address)
out = {}
out["eval"] = client.eval(name + ".upper", b"hey").decode()
# Three results for three messages: `drop` gives none and `twice` gives two.
out["job"] = sorted(
    r.decode() for r in client.job(name + ".reverse", iter([b"drop", b"ab", b"twice"]), messages=3)
)
# A hook that panics loses its message, and the master goes on.
out["after_panic"] = [r.decode() for r in client.job(name + ".upper", iter([b"boom", b"ok"]), messages=1)]
out["last"] = client.eval(name + ".upper", b"still here").decode()
print(json.dumps(out))
