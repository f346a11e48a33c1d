"""A real pylm 0.14 Worker for the pylm_mixed example: its answers say they come from pylm.

    python pylm_worker.py NAME DB_ADDRESS
"""
import sys

from pylm.servers import Worker


class TaggedWorker(Worker):
    def upper(self, message):
        return b"pylm says: " + message.decode("utf-8").upper().encode("utf-8")


TaggedWorker(sys.argv[1], db_address=sys.argv[2]).start()
