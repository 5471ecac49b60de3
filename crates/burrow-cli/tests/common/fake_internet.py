import http.server, socket, socketserver, struct, threading, sys

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("fake-internet host=%s path=%s\n" % (self.headers.get("Host"), self.path)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

class TS(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

def tls():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 443)); s.listen(64)
    while True:
        c, _ = s.accept()
        try:
            c.settimeout(5)
            if c.recv(1) == b"\x16":
                c.sendall(b"tls-ok\n")
        except Exception:
            pass
        c.close()

def dns():
    # Bound to the address itself, so answers come from the address that was asked.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 53))
    ip = bytes(int(x) for x in sys.argv[1].split("."))
    while True:
        q, addr = s.recvfrom(512)
        try:
            i, labels = 12, []
            while q[i]:
                labels.append(q[i+1:i+1+q[i]].decode().lower()); i += 1 + q[i]
            qtype = struct.unpack(">H", q[i+1:i+3])[0]
            name = ".".join(labels)
            ok = name.endswith(".test") or name == "fake.internet"
            question = q[12:i+5]
            if ok and qtype == 1:
                hdr = q[:2] + b"\x81\x80" + b"\x00\x01\x00\x01\x00\x00\x00\x00"
                ans = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + ip
                s.sendto(hdr + question + ans, addr)
            else:
                rcode = b"\x81\x80" if ok else b"\x81\x83"
                s.sendto(q[:2] + rcode + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question, addr)
        except Exception:
            pass

def hold():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 7000)); s.listen(4096)
    threading.Event().wait()

for f in (tls, dns, hold):
    threading.Thread(target=f, daemon=True).start()
TS(("0.0.0.0", 80), H).serve_forever()
