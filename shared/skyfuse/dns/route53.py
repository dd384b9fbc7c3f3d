"""Amazon Route 53 as the DNS backend: weighted records read with `list_resource_record_sets`
and changed with one atomic `change_resource_record_sets` batch (UPSERT, so a redelivered
placement changes nothing). Works against LocalStack's Route 53 with `dns.endpoint_url`."""
from __future__ import annotations

from typing import Any

from skyfuse.config import Dns
from skyfuse.dns.records import Change, Record
from skyfuse.errors import Failure

TYPES = ("A", "AAAA", "CNAME")


class ZoneNotFound(Failure, LookupError):
    pass


class Route53:
    def __init__(self, settings: Dns):
        import boto3

        # Route 53 is global; its API lives in us-east-1
        self.client = boto3.client("route53", endpoint_url=settings.endpoint_url or None, region_name="us-east-1")
        self.settings = settings
        self._zone_id = settings.hosted_zone_id.removeprefix("/hostedzone/") or None
        self._raw: dict[tuple[str, str, str], dict[str, Any]] = {}  # what Route 53 returned, for exact DELETEs

    @property
    def zone_id(self) -> str:
        if self._zone_id is None:
            zone = self.settings.zone
            found = self.client.list_hosted_zones_by_name(DNSName=zone, MaxItems="1")["HostedZones"]
            if not found or found[0]["Name"] != zone:
                where = self.settings.endpoint_url or "AWS"
                raise ZoneNotFound(f"no hosted zone {zone} in Route 53 ({where}): create it (the SAM template takes "
                                   "its id; for LocalStack `python infra/emulators/bootstrap.py --route53 URL`), "
                                   "or set dns.hosted_zone_id")
            self._zone_id = found[0]["Id"].removeprefix("/hostedzone/")
        return self._zone_id

    def records(self, name: str) -> list[Record]:
        out: list[Record] = []
        pages = self.client.get_paginator("list_resource_record_sets").paginate(
            HostedZoneId=self.zone_id, StartRecordName=name)
        for page in pages:
            for raw in page["ResourceRecordSets"]:
                if raw["Name"] != name:
                    return out  # sorted by name: past ours
                if raw["Type"] in TYPES and "SetIdentifier" in raw and "Weight" in raw and raw.get("ResourceRecords"):
                    self._raw[(name, raw["Type"], raw["SetIdentifier"])] = raw
                    out.append(Record(name=name, type=raw["Type"], set_id=raw["SetIdentifier"], weight=raw["Weight"],
                                      value=raw["ResourceRecords"][0]["Value"], ttl=raw.get("TTL", 0)))
        return out

    def apply(self, changes: list[Change]) -> None:
        batch = []
        for change in changes:
            raw = self._raw.get((change.record.name, *change.record.key)) if change.action == "DELETE" else None
            batch.append({"Action": change.action, "ResourceRecordSet": raw or _record_set(change.record)})
        self.client.change_resource_record_sets(HostedZoneId=self.zone_id, ChangeBatch={
            "Comment": "skyfuse router: weights from placement.changed", "Changes": batch})


def _record_set(record: Record) -> dict[str, Any]:
    return {"Name": record.name, "Type": record.type, "SetIdentifier": record.set_id, "Weight": record.weight,
            "TTL": record.ttl, "ResourceRecords": [{"Value": record.value}]}
