"""OPC UA bioreactor against the asyncua client: browsable LADS-like structure, values
equal to the model at their source timestamp, writes, subscriptions, faults, security."""

from __future__ import annotations

import asyncio
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua

from agent.core.certs import create_certificate
from cleanroom_common.profilefiles import load_profile
from simulators.servers.faults import CommFault
from simulators.servers.opcua import APPLICATION_URI, NAMESPACE, serve_bioreactor_opcua

PROFILE = load_profile("bioreactor-sim-opcua")


async def test_address_space_values_writes_subscription_and_faults() -> None:
    async with serve_bioreactor_opcua(port=0, speed=600, seed=5, update_interval_s=0.1) as sim:
        async with Client(sim.url, timeout=5) as client:
            idx = await client.get_namespace_index(NAMESPACE)
            # browsable by path, LADS-like: device / function / variable, with EU properties
            current = await client.nodes.objects.get_child(
                [f"{idx}:Bioreactor", f"{idx}:FunctionalUnit", f"{idx}:Temperature", f"{idx}:CurrentValue"]
            )
            assert current.nodeid == ua.NodeId("Bioreactor.FunctionalUnit.Temperature.CurrentValue", idx)
            eu_range = await client.get_node(
                ua.NodeId("Bioreactor.FunctionalUnit.Temperature.CurrentValue.EURange", idx)
            ).read_value()
            assert (eu_range.Low, eu_range.High) == (0.0, 60.0)
            units = await client.get_node(
                ua.NodeId("Bioreactor.FunctionalUnit.Temperature.CurrentValue.EngineeringUnits", idx)
            ).read_value()
            assert units.DisplayName.Text == "degC" and units.UnitId == int.from_bytes(b"CEL", "big")

            # every profile node, read in one call, equals the model at its source timestamp
            nodes = [
                client.get_node(t["node_id"].replace(f"nsu={NAMESPACE}", f"ns={idx}"))
                for t in PROFILE["tags"]
            ]
            values = await client.read_attributes(nodes, ua.AttributeIds.Value)
            stamps = {dv.SourceTimestamp for dv in values}
            assert len(stamps) == 1  # one instant per update
            t = next(iter(stamps)).replace(tzinfo=UTC).timestamp()
            served = sim.server.history[min(sim.server.history, key=lambda k: abs(k - t))]
            assert abs(min(sim.server.history, key=lambda k: abs(k - t)) - t) < 1e-3
            for tag, dv in zip(PROFILE["tags"], values, strict=True):
                assert dv.StatusCode.is_good(), tag["name"]
                assert dv.Value.Value == served[tag["name"]], tag["name"]
            assert served["state"] == "Running"

            # setpoints: writable, range enforced by the device
            target = client.get_node(ua.NodeId("Bioreactor.FunctionalUnit.Temperature.TargetValue", idx))
            await target.write_value(ua.DataValue(ua.Variant(36.5, ua.VariantType.Double)))
            assert sim.model.setpoints()["temperature_setpoint_c"] == 36.5
            with pytest.raises(ua.uaerrors.BadOutOfRange):
                await target.write_value(ua.DataValue(ua.Variant(90.0, ua.VariantType.Double)))
            assert sim.model.setpoints()["temperature_setpoint_c"] == 36.5
            assert await target.read_value() == 36.5
            with pytest.raises(ua.UaStatusCodeError):  # process values are read-only
                await current.write_value(ua.DataValue(ua.Variant(1.0, ua.VariantType.Double)))

            # subscriptions see the device change
            changes: asyncio.Queue[Any] = asyncio.Queue()

            class Handler:
                def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
                    changes.put_nowait(data.monitored_item.Value)

            sub = await client.create_subscription(50, Handler())
            await sub.subscribe_data_change(
                client.get_node(ua.NodeId("Bioreactor.FunctionalUnit.CultureDay.SensorValue", idx))
            )
            first = await asyncio.wait_for(changes.get(), 3)
            second = await asyncio.wait_for(changes.get(), 3)
            assert second.Value.Value > first.Value.Value
            await sub.delete()

            # faults become status codes on every value
            sim.device.faults.force(CommFault.EXCEPTION)
            await asyncio.sleep(0.3)
            dv = await current.read_data_value(raise_on_bad_status=False)
            assert dv.StatusCode.value == ua.StatusCodes.BadDeviceFailure
            sim.device.faults.force(CommFault.TIMEOUT)
            await asyncio.sleep(0.3)
            dv = await current.read_data_value(raise_on_bad_status=False)
            assert dv.StatusCode.value == ua.StatusCodes.BadTimeout
            sim.device.faults.force(CommFault.DISCONNECT)
            await asyncio.sleep(0.3)
            with pytest.raises((ConnectionError, asyncio.TimeoutError, ua.UaError, OSError)):
                await asyncio.wait_for(current.read_value(), 2)
        with pytest.raises((ConnectionError, OSError, asyncio.TimeoutError)):
            async with Client(sim.url, timeout=1):
                pass
        sim.device.faults.force(None)
        await asyncio.sleep(0.3)
        async with Client(sim.url, timeout=5) as client:
            idx = await client.get_namespace_index(NAMESPACE)  # same index after the outage
            node = client.get_node(ua.NodeId("Bioreactor.FunctionalUnit.PH.CurrentValue", idx))
            dv = await node.read_data_value()
            assert dv.StatusCode.is_good() and 6.5 < dv.Value.Value < 7.8


async def test_secure_endpoints_and_user_login(tmp_path: Path) -> None:
    server = create_certificate(tmp_path / "server", APPLICATION_URI, ["localhost"], server=True)
    client_uri = "urn:cleanroom-edge:test:client"
    client_cert = create_certificate(tmp_path / "client", client_uri, ["localhost"])
    async with serve_bioreactor_opcua(
        port=0, speed=60, cert=server.cert, key=server.key, user="operator", password="s3cret"
    ) as sim:
        endpoints = await Client(sim.url, timeout=5).connect_and_get_server_endpoints()
        offered = {(e.SecurityPolicyUri.rsplit("#", 1)[1], e.SecurityMode.name) for e in endpoints}
        for policy in ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"):
            assert {(policy, "Sign"), (policy, "SignAndEncrypt")} <= offered
        assert ("None", "None_") in offered

        client = Client(sim.url, timeout=5)
        client.application_uri = client_uri
        await client.set_security_string(
            f"Aes256Sha256RsaPss,SignAndEncrypt,{client_cert.cert},{client_cert.key},{server.cert}"
        )
        client.set_user("operator")
        client.set_password("s3cret")
        async with client:
            idx = await client.get_namespace_index(NAMESPACE)
            value = await client.get_node(
                ua.NodeId("Bioreactor.FunctionalUnit.DO.CurrentValue", idx)
            ).read_value()
            assert 0 < value < 200

        anonymous = Client(sim.url, timeout=5)
        with pytest.raises(ua.UaError):
            async with anonymous:
                pass
