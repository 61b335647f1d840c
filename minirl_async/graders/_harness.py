"""The code grader's in-sandbox harness (see code.py) as the one script the sandbox runs.

The harness is never imported where it runs: the sandbox, chrooted into its private root, cannot see the
project's files, so its source reaches it as `python -I -c <HARNESS> <json config>`, possibly run by another
interpreter than the grader's (standard library only, Python >= 3.8 syntax at run time). HARNESS is the
sources of these parts joined in this order, one namespace at run time:

    _harness_isolate.py  start-up: private root, dropped privileges, no network
    _harness_wire.py     the pipes between program and judge: Channel (framing), Codec (values as plain data)
    _harness_proxy.py    Proxy: an object of the other side
    _harness_peer.py     Peer: requests on the other side's objects and serving them, the judge's namespace
    _harness_roles.py    the roles script / program / judge / probe, and main

A part imports the names of the other parts only under TYPE_CHECKING (for the type checker; in the script
they are already defined), and only the first part, which opens the script, carries `from __future__ import
annotations` (it then covers every part).
"""

from __future__ import annotations

from pathlib import Path

PARTS = ("_harness_isolate.py", "_harness_wire.py", "_harness_proxy.py", "_harness_peer.py", "_harness_roles.py")
HARNESS = "\n\n".join(Path(__file__).with_name(name).read_text() for name in PARTS)
MARKER = b"minirl-judge: every test passed\n"  # _harness_roles.MARKER: the judge's verdict
assert MARKER.decode().strip() in HARNESS, "_harness.py and _harness_roles.py disagree on the verdict marker"
# A part that breaks the joined script (a second `from __future__`, ...) fails here, not as "no sandbox works".
compile(HARNESS, "<string>", "exec", dont_inherit=True)
