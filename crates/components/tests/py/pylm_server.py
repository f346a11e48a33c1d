"""Runs a real pylm 0.14 Server until killed.

    python pylm_server.py NAME PULL_ADDRESS PUB_ADDRESS DB_ADDRESS

Functions: upper, and fail (raises). The caller (a rylm test) connects a rylm Client to it.
"""
import sys

from pylm.servers import Server


class TextServer(Server):
    def upper(self, message):
        return message.decode("utf-8").upper().encode("utf-8")

    def fail(self, message):
        raise ValueError("failed on purpose")


name, pull, pub, db = sys.argv[1:5]
server = TextServer(name, db_address=db, pull_address=pull, pub_address=pub)
print("starting", flush=True)
server.start()
