"""The privacy floor: the lowest split layer a session may run at (pure).

Process: the API server (the admission policy, :mod:`vllm_split.control.policy`, and the
session's check of a fixed split layer, :mod:`vllm_split.api.session`). No vLLM, no asyncio.

Why. The hidden state entering a shallow layer can be inverted back to the tokens; at
``k = 0`` it is the token embedding, which names them exactly. A server operator (the
``privacy_floor`` option) and a client (``Open.privacy_floor``) may each set a floor ``F``:
the server then never receives an activation shallower than layer ``F``. A session's
floor is the highest of the two and of the server's ``min_layer`` (the layers it does not
hold); a session whose privacy floor is above 0 is never decoded on the server, which
would take its token ids. Unlike ``min_layer`` a privacy floor is policy only: the server
holds every layer and still serves ordinary requests.
"""
from __future__ import annotations


def effective_floor(*, min_layer: int, server_floor: int, client_floor: int) -> int:
    """The lowest split layer a session may be placed at."""
    return max(min_layer, server_floor, client_floor)


def describe_floor(*, server_floor: int, client_floor: int) -> str:
    """The binding privacy floor and who set it, for messages ("the client's privacy floor 12
    (Open.privacy_floor)")."""
    floor = max(server_floor, client_floor)
    if client_floor == server_floor:
        return f"the client's and this server's privacy floor {floor}"
    if client_floor > server_floor:
        return f"the client's privacy floor {floor} (Open.privacy_floor)"
    return f"this server's privacy floor {floor} (its privacy_floor option)"


def floor_violation(split_layer: int, *, server_floor: int, client_floor: int) -> str | None:
    """Why a fixed ``split_layer`` is refused for being below a privacy floor (None: it is not)."""
    floor = max(server_floor, client_floor)
    if split_layer >= floor:
        return None
    whose = describe_floor(server_floor=server_floor, client_floor=client_floor)
    return (f"split_layer {split_layer} is below {whose}: expected split_layer >= {floor} (the server takes no "
            f"activation shallower than layer {floor})")
