"""asm_node: the node agent. Runs provider CLIs on this host and streams their events.

Layout: ``agent`` (admission, handshake, preflight, run registry), ``run`` (one
CLI run: buffer, followers, lifecycle), ``process`` (spawn, line framing,
signals, reaping), ``providers/`` (one module per provider: command builder and
parser), ``server`` (the gRPC adapter: auth, TLS, errors).
"""

from asm_node.agent import CAPABILITIES, NodeAgent
from asm_node.config import NodeConfig
from asm_node.server import NodeServer, serve, start_server

__all__ = ["CAPABILITIES", "NodeAgent", "NodeConfig", "NodeServer", "serve", "start_server"]
