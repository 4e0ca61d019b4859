#!/usr/bin/env python3
"""A test DNS server for tests/docker/rootless.sh: UDP, A records only.

Usage: dns.py ADDR NAME=IPV4 [NAME=IPV4...]
Answers NAME's A query with IPV4 (TTL 5), every other query with NXDOMAIN (no record of
that type for a known name: an empty answer), and prints each query on stdout.
"""
import socket
import struct
import sys


def main():
    addr = sys.argv[1]
    records = dict(a.split("=", 1) for a in sys.argv[2:])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 53))
    while True:
        msg, peer = s.recvfrom(4096)
        if len(msg) < 12:
            continue
        qid, _flags, qd = struct.unpack("!HHH", msg[:6])
        if qd != 1:
            continue
        labels, i = [], 12
        while i < len(msg) and msg[i] != 0:
            n = msg[i]
            labels.append(msg[i + 1 : i + 1 + n].decode("ascii", "replace"))
            i += 1 + n
        question = msg[12 : i + 5]
        if len(msg) < i + 5:
            continue
        qtype = struct.unpack("!H", msg[i + 1 : i + 3])[0]
        name = ".".join(labels).lower()
        print(f"query {name} type {qtype} from {peer[0]}", flush=True)
        answer = b""
        rcode = 3
        if name in records:
            rcode = 0
            if qtype == 1:
                answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4)
                answer += socket.inet_aton(records[name])
        header = struct.pack(
            "!HHHHHH", qid, 0x8180 | rcode, 1, 1 if answer else 0, 0, 0
        )
        s.sendto(header + question + answer, peer)


if __name__ == "__main__":
    main()
