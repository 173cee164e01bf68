#!/usr/bin/env python3
"""The most one loopback TCP connection carries from the page cache on this machine.

A server thread sends a file of 256 MiB, already in the page cache, to a client on the same
machine over one connection, four times; the client receives into a 1 MiB buffer. The
server either reads the file into a buffer and sends it (`copy`, what the daemon does) or
hands the file to the kernel (`sendfile`, no copy in the sender). Prints the best of the four
transfers for each mode and chunk size. Usage: python3 bench/loopback_ceiling.py [DIR]
"""
import os
import socket
import sys
import tempfile
import threading
import time

SIZE = 256 << 20


def transfer(path, mode, chunk):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        buf = memoryview(bytearray(chunk))
        for _ in range(4):
            conn.recv(1)
            fd = os.open(path, os.O_RDONLY)
            off = 0
            while off < SIZE:
                if mode == "sendfile":
                    off += os.sendfile(conn.fileno(), fd, off, min(chunk, SIZE - off))
                else:
                    n = os.preadv(fd, [buf], off)
                    conn.sendall(buf[:n])
                    off += n
            os.close(fd)
        conn.close()

    server = threading.Thread(target=serve)
    server.start()
    client = socket.create_connection(srv.getsockname())
    buf = memoryview(bytearray(1 << 20))
    best = 0.0
    for _ in range(4):
        start = time.perf_counter()
        client.send(b"x")
        got = 0
        while got < SIZE:
            got += client.recv_into(buf)
        best = max(best, SIZE / (1 << 20) / (time.perf_counter() - start))
    server.join()
    client.close()
    srv.close()
    return best


def main():
    with tempfile.TemporaryDirectory(dir=sys.argv[1] if len(sys.argv) > 1 else None) as d:
        path = os.path.join(d, "data")
        with open(path, "wb") as f:
            for _ in range(SIZE >> 20):
                f.write(os.urandom(1 << 20))
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
        for chunk in (64 << 10, 1 << 20):
            for mode in ("copy", "sendfile"):
                print(f"{mode:8} {chunk >> 10:5} KiB chunks: {transfer(path, mode, chunk):6.0f} MiB/s")


if __name__ == "__main__":
    main()
