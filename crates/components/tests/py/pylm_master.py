"""Runs a real pylm 0.14 Master (no functions of its own: its workers have them) until killed.

    python pylm_master.py NAME PULL PUB WORKER_PULL WORKER_PUSH DB
"""
import sys

from pylm.servers import Master

name, pull, pub, worker_pull, worker_push, db = sys.argv[1:7]
master = Master(name, pull_address=pull, pub_address=pub, worker_pull_address=worker_pull,
                worker_push_address=worker_push, db_address=db)
print("starting", flush=True)
master.start()
