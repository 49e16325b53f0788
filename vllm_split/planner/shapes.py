"""Placement shapes as small automata over the chain.

A state is a location (client or server) plus the location of node 0 (which the decode
step's token feedback depends on) plus, for the U shape, the phase. Consecutive nodes may
only move along the automaton's transitions, so one DP serves every shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from .problem import Shape

CLIENT, SERVER = 0, 1


@dataclass(frozen=True, slots=True)
class Automaton:
    locations: tuple[int, ...]  # per state: CLIENT or SERVER
    first: tuple[int, ...]  # per state: location of node 0 on every path through it
    initial: tuple[int, ...]  # states allowed at node 0
    predecessors: tuple[tuple[int, ...], ...]  # per state: states allowed at the previous node
    # per state: a server state that it may move to and stay in until the end (-1: none);
    # the DP closes partial placements with these tails into complete ones (incumbents)
    server_tail: tuple[int, ...]
    # per state: a client state it may move to and stay in until the end (-1: none)
    client_tail: tuple[int, ...]
    # per state, for the DP's bounds: may a later node run on the client / on the server /
    # on the client and, later still, on the server?
    later_client: tuple[bool, ...]
    later_server: tuple[bool, ...]
    client_then_server: tuple[bool, ...]


_AUTOMATA = {
    # states: 0 client (first C), 1 server (first C), 2 client (first S), 3 server (first S)
    Shape.GENERAL: Automaton(
        locations=(CLIENT, SERVER, CLIENT, SERVER),
        first=(CLIENT, CLIENT, SERVER, SERVER),
        initial=(0, 3),
        predecessors=((0, 1), (0, 1), (2, 3), (2, 3)),
        server_tail=(1, 1, 3, 3),
        client_tail=(0, 0, 2, 2),
        later_client=(True,) * 4,
        later_server=(True,) * 4,
        client_then_server=(True,) * 4,
    ),
    # states: 0 client prefix, 1 server after a client prefix, 2 server-only
    Shape.PREFIX: Automaton(
        locations=(CLIENT, SERVER, SERVER),
        first=(CLIENT, CLIENT, SERVER),
        initial=(0, 2),
        predecessors=((0,), (0, 1), (2,)),
        server_tail=(1, 1, 2),
        client_tail=(0, -1, -1),
        later_client=(True, False, False),
        later_server=(True, True, True),
        client_then_server=(True, False, False),
    ),
    # states: 0 client head, 1 server middle, 2 client tail; 3 server from node 0, 4 its
    # client tail
    Shape.U: Automaton(
        locations=(CLIENT, SERVER, CLIENT, SERVER, CLIENT),
        first=(CLIENT, CLIENT, CLIENT, SERVER, SERVER),
        initial=(0, 3),
        predecessors=((0,), (0, 1), (1, 2), (3,), (3, 4)),
        server_tail=(1, 1, -1, 3, -1),
        client_tail=(0, 2, 2, 4, 4),
        later_client=(True,) * 5,
        later_server=(True, True, False, True, False),
        client_then_server=(True, False, False, False, False),
    ),
}


def automaton_for(shape: Shape) -> Automaton:
    return _AUTOMATA[Shape(shape)]
