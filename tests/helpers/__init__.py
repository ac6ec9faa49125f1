"""Helpers shared by the tests (and by ``bench/``): import them from their module, e.g.
``from tests.helpers.mounts import Mount``. Fixtures stay in the conftest.py files.

- ``cli``       running the bpfs CLI (``python -m bpfs``): its environment, passphrase, errors
- ``procs``     processes: alive or not, why not dead yet, killing, waiting for a condition
- ``mounts``    the mount table, unmounting the hard way, the ``Mount`` object (a store and a
                mountpoint driven through the CLI), tmpfs mounts
- ``files``     hashes, sizes, generated trees and their comparison, errno assertions
- ``partners``  partner stores (``Store``, ``Server``, ``Owner``), pairing, recovery, the
                plaintext ``MARKER`` and data carrying it
- ``broker``    a real broker program in a process (``BrokerProcess``)
- ``netlab``    the network lab: UDP proxies, network namespaces, the NAT lab, UDP helpers,
                packet capture (a package; ``python -m tests.helpers.netlab`` runs its helpers)

Nothing here defines a fixture or imports a test module or conftest, and nothing here sets up
the test session: that is tests/conftest.py's job (and tests/partners/conftest.py's).
"""
