"""sf-guestd in a real guest: many guest processes use the API at once, and clients
SIGKILLed at random leave nothing behind (sflib.guest, sf-guestd(8))."""

from __future__ import annotations

import re

import pytest

from sflib.image import build as image
from tests.integration.conftest import Host, boot, console, running_host

pytestmark = [pytest.mark.vm, pytest.mark.slow]

# 300 guest processes connect to the agent, place a watch and start a transaction,
# and are SIGKILLed: 200 once their requests were answered (each says so through a
# pipe), 100 at a random moment, before or during them. Then one client places 120
# watches and starts 9 transactions, nearly all of the domain's quotas (128 and 10):
# far over them if the killed clients' watches and transactions were left. (The one
# of each left is for the last client killed, whose end the agent may not have
# handled yet when the new client's requests come: two sockets, no order.)
KILLER = r"""
import os,random,select,socket,struct,time
P="/run/xenstored/socket"
def pk(op,i,b):return struct.pack("<IIII",op,i,0,len(b))+b
def rd(s,n):
 b=b"";r=[]
 while len(r)<n:
  b+=s.recv(65536)
  while len(b)>=16:
   op,_,_,l=struct.unpack("<IIII",b[:16])
   if len(b)<16+l:break
   if op!=15:r.append(op)
   b=b[16+l:]
 return r
half=0
for i in range(300):
 r,w=os.pipe();c=os.fork()
 if c==0:
  s=socket.socket(socket.AF_UNIX);s.connect(P)
  s.sendall(pk(4,1,b"data/k%d\0t\0"%i)+pk(6,2,b"\0"));rd(s,2);os.write(w,b"x");time.sleep(60)
 if i%3:os.read(r,1)
 else:time.sleep(random.random()*.05);half+=not select.select([r],[],[],0)[0]
 os.kill(c,9);os.waitpid(c,0);os.close(w);os.close(r)
s=socket.socket(socket.AF_UNIX);s.connect(P)
q=[pk(4,j+1,b"data/n%d\0t\0"%j) for j in range(120)]+[pk(6,200+j,b"\0") for j in range(9)]
s.sendall(b"".join(q))
r=rd(s,129)
print("HALFWAY",half,"ERRORS",r.count(16),"OK",len(r)-r.count(16))
"""

MANY = (
    """
t=$(sf-ticket 2)
id=$(sf-clone --no-avoidance "$t")
[ "$id" = 0 ] || sf-exit 0
at_once() { for i in 1 2 3 4 5 6 7 8; do { "$@" >/tmp/$1$i 2>&1; echo "rc=$?" >>/tmp/$1$i; } &
 done; wait; for i in 1 2 3 4 5 6 7 8; do echo "$1 $(tr '\\n' ' ' </tmp/$1$i)"; done; }
at_once sf-join "$t"
at_once sf-ticket 1
cat >/tmp/k.py <<'PY'"""
    + KILLER
    + """PY
python3 /tmp/k.py
u=$(sf-ticket 1) && echo "TICKET-AFTER $u"
echo SF-DONE
"""
)


def test_eight_processes_at_once_and_300_killed_clients_leave_the_api_working(
    guest_image: image.Result,
) -> None:
    with running_host(guest_image, "--max-clones", "11") as host:  # 2 + 8 + 1 tickets
        check_many(host)


def check_many(host: Host) -> None:
    boot(host, "many", MANY, memory=512)
    out = console(host, "many", timeout=600)
    print(out)  # shown when an assertion fails
    tickets = re.findall(r"^sf-ticket (t\S+) rc=0 $", out, re.M)  # eight at once, each its own
    assert len(set(tickets)) == 8, re.findall(r"^sf-ticket .*$", out, re.M)
    joins = sorted(re.findall(r"^sf-join (.*)$", out, re.M))
    assert joins[0] == "1 exited 0 2 exited 0 rc=0 ", joins  # one of them joins the clones
    assert all(j.endswith("was already joined or killed rc=4 ") for j in joins[1:]), joins
    killed = re.search(r"^HALFWAY (\d+) ERRORS (\d+) OK (\d+)", out, re.M)
    assert killed, out[-2000:]
    halfway, errors, ok = map(int, killed.groups())
    assert (errors, ok) == (0, 129)  # nothing the killed clients held is still held
    print(f"{halfway} of the 100 clients killed at random were killed halfway")
    assert re.search(r"^TICKET-AFTER \S+", out, re.M)
