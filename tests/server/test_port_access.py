"""Ports on the real server, on both databases: port tickets (who gets one, what it says, that the exec gateway
refuses it) and the organization's ``allow_public_ports``, enforced on create and on patch."""

from __future__ import annotations

import time

import pytest

from devyard.client import ApiError
from devyard.wire.access import EnvironmentAccess, GatewayKey, TicketError, decode_key, verify_ticket

from .test_access import World, server_settings, status_of, world  # noqa: F401 - fixtures


def test_a_port_ticket_names_the_user_and_organization_and_is_no_exec_ticket(world: World) -> None:  # noqa: F811
    answer = EnvironmentAccess.model_validate(
        world.admin.post(f"/api/v1/environments/{world.env_id}/access", {"scope": "port"})
    )
    assert answer.scope == "port"
    key = decode_key(GatewayKey.model_validate(world.runner.get(f"/api/v1/runners/{world.runner_id}/gateway-key")).key)
    claims = verify_ticket(answer.ticket, key, now=time.time(), scope="port")
    assert (claims.environment_id, claims.organization_id, claims.scope) == (world.env_id, world.org, "port")
    assert claims.exp - time.time() > 300  # good for many requests, not one
    with pytest.raises(TicketError, match="not exec"):
        verify_ticket(answer.ticket, key, now=time.time())
    # Without a body the answer is an exec ticket, as before.
    plain = EnvironmentAccess.model_validate(world.admin.post(f"/api/v1/environments/{world.env_id}/access"))
    assert verify_ticket(plain.ticket, key, now=time.time()).scope == "exec"
    # Someone who cannot see the environment gets none.
    with world.user("member") as member:
        assert status_of(lambda: member.post(f"/api/v1/environments/{world.env_id}/access", {"scope": "port"})) == 404
    assert status_of(lambda: world.admin.post(f"/api/v1/environments/{world.env_id}/access", {"scope": "x"})) == 422


def test_public_ports_follow_the_organizations_policy(world: World) -> None:  # noqa: F811
    public = {"spec": {"ports": [{"port": 3000, "admission": "everyone"}]}}
    world.admin.patch(f"/api/v1/environments/{world.env_id}", public)
    world.admin.patch(f"/api/v1/organizations/{world.org}", {"spec": {"policy": {"allow_public_ports": False}}})
    with pytest.raises(ApiError) as refused:
        world.admin.patch(f"/api/v1/environments/{world.env_id}", public)
    assert (
        refused.value.status == 403
        and "does not allow public ports" in str(refused.value)
        and "3000" in str(refused.value)
    )
    assert (
        status_of(lambda: world.admin.post("/api/v1/environments", {"spec": {"image": "debian", **public["spec"]}}))
        == 403
    )
    shared = {"spec": {"ports": [{"port": 3000, "admission": "organization"}]}}
    assert (
        world.admin.patch(f"/api/v1/environments/{world.env_id}", shared)["spec"]["ports"][0]["admission"]
        == "organization"
    )
    # Other changes of an environment stored before the policy changed are not refused.
    world.admin.patch(f"/api/v1/environments/{world.env_id}", {"spec": {"env": {"A": "1"}}})
