"""Runs a real pylm 0.14 Worker until killed.

    python pylm_worker.py NAME DB_ADDRESS

Functions: upper, reverse, and fail (raises).
"""
import sys

from pylm.servers import Worker


class TextWorker(Worker):
    def upper(self, message):
        return message.decode("utf-8").upper().encode("utf-8")

    def reverse(self, message):
        return message.decode("utf-8")[::-1].encode("utf-8")

    def fail(self, message):
        raise ValueError("failed on purpose")


TextWorker(sys.argv[1], db_address=sys.argv[2]).start()
