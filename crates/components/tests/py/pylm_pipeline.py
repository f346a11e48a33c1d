"""Runs a real pylm 0.14 Pipeline stage (publishing on to the next stage) until killed.

    python pylm_pipeline.py NAME DB SUB_ADDRESS PUB_ADDRESS PREVIOUS

Function: reverse.
"""
import sys

from pylm.servers import Pipeline


class Middle(Pipeline):
    def reverse(self, message):
        return message.decode("utf-8")[::-1].encode("utf-8")


name, db, sub, pub, previous = sys.argv[1:6]
Middle(name, db_address=db, sub_address=sub, pub_address=pub, previous=previous, to_client=False).start()
