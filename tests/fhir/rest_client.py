"""Exercises chartmesh's FHIR R4 REST API with an independent client (fhirpy, from PyPI).

Usage: rest_client.py BASE_URL TOKEN
Prints one line per check ("ok: ..." or "FAIL: ...") and a final JSON line with what it
created; exits 0 only when every check passed. Nothing here is chartmesh code.
"""
import json
import sys

from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import AuthorizationError, OperationOutcome, ResourceNotFound

base, token = sys.argv[1], sys.argv[2]
client = SyncFHIRClient(base, authorization=f"Bearer {token}")
failed = 0


def check(what, cond):
    global failed
    print(("ok: " if cond else "FAIL: ") + what, flush=True)
    if not cond:
        failed += 1


meta = client.execute("metadata", method="get")
check("metadata is a CapabilityStatement for FHIR 4.0.1",
      meta["resourceType"] == "CapabilityStatement" and meta["fhirVersion"] == "4.0.1")
served = {r["type"] for r in meta["rest"][0]["resource"]}
check("it serves the clinical types", {"Patient", "Condition", "MedicationRequest", "AllergyIntolerance",
                                       "Observation", "Immunization", "Encounter", "Procedure"} <= served)

# A transaction Bundle goes through the import path and its patient matching.
bundle = {
    "resourceType": "Bundle", "type": "transaction",
    "entry": [
        {"fullUrl": "urn:uuid:7e57c11e-0000-4000-8000-000000000001",
         "resource": {"resourceType": "Patient",
                      "identifier": [{"system": "urn:oid:1.2.3.4.5", "value": "REST-1"}],
                      "name": [{"family": "Abara", "given": ["Ngozi"]}], "gender": "female",
                      "birthDate": "1979-06-30"},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Condition",
                      "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                      "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertensive disorder"}]},
                      "subject": {"reference": "urn:uuid:7e57c11e-0000-4000-8000-000000000001"}},
         "request": {"method": "POST", "url": "Condition"}},
        {"resource": {"resourceType": "Observation", "status": "final",
                      "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"}]},
                      "subject": {"reference": "urn:uuid:7e57c11e-0000-4000-8000-000000000001"},
                      "effectiveDateTime": "2025-04-01T09:00:00Z",
                      "valueQuantity": {"value": 138, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
         "request": {"method": "POST", "url": "Observation"}},
    ],
}
resp = client.execute("", method="post", data=bundle)
check("a transaction gets a transaction-response", resp["type"] == "transaction-response" and len(resp["entry"]) == 3)
loc = resp["entry"][0]["response"].get("location", "")
check("the patient's entry says where it went", loc.startswith("Patient/"))
pid = loc.split("/", 1)[1]

# Search and read.
found = client.resources("Patient").search(identifier="urn:oid:1.2.3.4.5|REST-1").fetch()
check("search by identifier system|value finds the patient", len(found) == 1 and found[0]["id"] == pid)
check("another system with the same value finds nobody",
      len(client.resources("Patient").search(identifier="urn:oid:9.9.9|REST-1").fetch()) == 0)
check("search by family finds the patient", any(p["id"] == pid for p in client.resources("Patient").search(family="abar").fetch()))
check("search by birthdate finds the patient", any(p["id"] == pid for p in client.resources("Patient").search(birthdate="1979-06-30").fetch()))
check("search by name finds the patient", any(p["id"] == pid for p in client.resources("Patient").search(name="Ngozi").fetch()))
patient = client.reference("Patient", pid).to_resource()
check("read Patient", patient["name"][0]["family"] == "Abara")
conds = client.resources("Condition").search(patient=pid).fetch()
check("search Condition by patient", len(conds) == 1 and conds[0]["subject"]["reference"] == f"Patient/{pid}")
obs = client.resources("Observation").search(patient=pid).fetch()
check("search Observation by patient keeps the value", len(obs) == 1 and obs[0]["valueQuantity"]["value"] == 138)
again = client.reference("Observation", obs[0]["id"]).to_resource()
check("read Observation", again["code"]["coding"][0]["code"] == "8480-6")
everything = client.execute(f"Patient/{pid}/$everything", method="get")
types = sorted({e["resource"]["resourceType"] for e in everything["entry"]})
check("$everything returns the patient's record", {"Patient", "Condition", "Observation"} <= set(types))

# A single resource added to the chart by subject reference.
imm = client.resource("Immunization", status="completed",
                      vaccineCode={"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "141", "display": "Influenza"}]},
                      patient={"reference": f"Patient/{pid}"}, occurrenceDateTime="2025-10-01")
imm.save()
check("create Immunization for the patient", len(client.resources("Immunization").search(patient=pid).fetch()) == 1)

# Posting the same patient again matches the chart (no duplicate).
client.execute("", method="post", data=bundle)
check("a repeated transaction does not duplicate the patient",
      len(client.resources("Patient").search(identifier="urn:oid:1.2.3.4.5|REST-1").fetch()) == 1)

# Errors are OperationOutcomes.
try:
    client.reference("Patient", "no-such-patient").to_resource()
    check("an unknown patient is not found", False)
except ResourceNotFound as e:
    check("an unknown patient is an OperationOutcome 404", "OperationOutcome" in str(e))
try:
    client.execute("", method="post", data={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"coding": [{"code": "x"}]},
                      "subject": {"reference": "urn:uuid:nobody"}, "effectiveDateTime": "2025-01-01"}}]})
    check("a bad transaction is refused", False)
except OperationOutcome as e:
    check("a bad transaction is refused with an OperationOutcome", e.resource["resourceType"] == "OperationOutcome")
try:
    client.resources("Condition").search(code="x").fetch()
    check("an unsupported search is refused", False)
except OperationOutcome as e:
    check("an unsupported search is an OperationOutcome", e.resource["issue"][0]["severity"] == "error")
try:
    SyncFHIRClient(base, authorization="Bearer wrong").execute("metadata", method="get")
    check("a wrong token is refused", False)
except AuthorizationError as e:
    check("a wrong token is refused with an OperationOutcome", "OperationOutcome" in str(e))

print(json.dumps({"patient": pid, "failed": failed}))
sys.exit(1 if failed else 0)
