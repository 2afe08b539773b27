"""Verdicts from the network probe: reachability, relay, clock, hole punch (pure).

``network_checks(result, ttl)`` turns a ``network.ProbeResult`` into ``Check``s (the
bootstrap peers themselves are judged before, by ``bootstrap.check_bootstrap``). What fails
a node: joining through them failing after all, a node nobody can dial (private, and no
relay took a reservation), or a clock so far off that peers drop its records. Unknown reachability, a failed hole punch and a small skew
are warnings: the node serves, but worse than it could.
"""

from __future__ import annotations

from volunteer.doctor.clock import check_clock, peer_skews
from volunteer.doctor.network import ProbeResult
from volunteer.doctor.report import Check, failed, ok, skipped, warn


def network_checks(result: ProbeResult, ttl: float) -> list[Check]:
    """The checks for a probe that joined through the bootstrap peers that answered a dial."""
    if not result.connected:
        why = result.error or result.bootstrap_error or "no answer"
        return [failed("libp2p", f"the bootstrap peers answered a dial, but joining the DHT through them "
                       f"failed ({why})", "run the doctor again; if it persists, the bootstrap peers are "
                       "overloaded or run another version", error=why)]
    return [_reachability(result), _relay(result), check_clock(peer_skews(result.entries, result.read_at), ttl),
            _holepunch(result)]


def _reachability(result: ProbeResult) -> Check:
    ports = ", ".join(map(str, result.listen_ports)) or "?"
    seen = f" at {result.observed_ip}" if result.observed_ip else ""
    data = {"reachability": result.reachability, "observed_ip": result.observed_ip,
            "public_addrs": result.public_addrs, "ports": result.listen_ports}
    if result.reachability == "public":
        return ok("reachability", f"public: a bootstrap peer dialled back TCP port {ports}{seen} "
                  "on a fresh connection", **data)
    if result.reachability == "private":
        return warn("reachability", f"behind NAT or firewall: peers see you{seen} but cannot dial "
                    f"TCP port {ports} back",
                    f"forward TCP port {ports} to this machine and join with --announce "
                    f"/ip4/{result.observed_ip or '<public ip>'}/tcp/<port> (the setting announce_addrs; "
                    "or rely on a relay, below)", **data)
    why = "; ".join(result.dialback_errors) or "no bootstrap peer answered the dial-back request"
    return warn("reachability", f"unknown: {why}",
                "the bootstrap peers may run an older version; reachability is re-checked by the daemon",
                **data)


def _relay(result: ProbeResult) -> Check:
    if result.reachability == "public":
        if result.relay:
            return ok("relay", f"not needed (public); relay in the swarm: {result.relay}", relay=result.relay)
        return ok("relay", "not needed (public); this node may relay for NATed peers itself")
    if result.relay:
        return ok("relay", f"reserved a slot on {result.relay}: NATed, but reachable through it",
                  relay=result.relay)
    errors = "; ".join(f"{a}: {e}" for a, e in list(result.relay_errors.items())[:2])
    detail = (f"no relay took a reservation ({errors})" if errors
              else "no relay configured and no connected peer offers one")
    if result.reachability == "private":
        return failed("relay", f"{detail}: behind NAT without a relay, nobody can reach this node",
                      "forward the listen port (see reachability), or add a reachable relay to the manifest: "
                      "network.relays: [/ip4/R/tcp/P/p2p/<relay peer id>]", errors=result.relay_errors)
    return warn("relay", detail, "add a relay to the manifest (network.relays) if this node is behind a NAT",
                errors=result.relay_errors)


def _holepunch(result: ProbeResult) -> Check:
    if result.punch_peer is None:
        return skipped("hole punch", "not offered: no volunteer in the DHT is reached through a relay")
    peer = result.punch_peer[:16]
    if result.punch_kind == "hole_punched":
        return ok("hole punch", f"punched a direct connection to {peer}… (it was reached through a relay)",
                  peer=result.punch_peer)
    if result.punch_kind == "direct":
        return ok("hole punch", f"reached {peer}… directly (no punch needed)", peer=result.punch_peer)
    return warn("hole punch", f"to {peer}…: {result.punch_error or 'failed'}",
                "traffic to NATed volunteers goes through relays (slower); forwarding your listen "
                "port lets them dial you", peer=result.punch_peer)
