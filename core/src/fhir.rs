//! FHIR R4 (4.0.1) in and out: a chart becomes one Bundle (Patient, Coverage, Condition,
//! AllergyIntolerance, MedicationRequest / MedicationStatement, Observation, Immunization,
//! Encounter, Procedure, DocumentReference, ServiceRequest, Provenance), and Bundles, single
//! resources or Bulk Data NDJSON become charts.
//!
//! Owns: the mapping, both ways (`export`, `import`), the per-resource account of an import
//! (mapped, skipped with a reason, or an error naming the entry), decimals kept as written
//! (`json`), the IPS document (`ips`) and patient matching's decision rules (`matching`).
//! Must not touch: the store or files; the daemon decides, with [`matching`], whether an
//! imported patient is a new chart, a stored one, or held for review.
//!
//! The mapping works on `serde_json::Value` rather than a full typed FHIR model: chartmesh
//! reads a defined part of R4, and every export is checked by an independent R4 validator in
//! the test suite. Fields of a chart that FHIR has no element for (the chart id, its
//! practice and timestamps, a status word that is not an R4 code) travel in extensions under
//! [`EXT`], so JSONL → FHIR → JSONL is exact. docs/CLINICAL.md has the fidelity table.

use serde_json::{Value, json};

pub mod export;
pub mod import;
mod ips;
pub mod json;
pub mod matching;

pub use export::{bundle_resources, chart_to_bundle, entry_uuid, is_ucum};
pub use import::{
    FhirImport, Orphan, Outcome, PatientRef, PatientSource, ResourceReport, TypeCounts, import,
    import_with_context, looks_like_fhir,
};
pub use ips::ips_bundle;

/// Base URL of chartmesh's extensions and identifier systems.
pub const EXT: &str = "https://chartmesh.org/fhir";

/// Code systems by the short names charts use, and their FHIR URIs.
const SYSTEMS: &[(&str, &str)] = &[
    ("ICD-10", "http://hl7.org/fhir/sid/icd-10"),
    ("ICD-10-CM", "http://hl7.org/fhir/sid/icd-10-cm"),
    ("SNOMED", "http://snomed.info/sct"),
    ("SNOMED-CT", "http://snomed.info/sct"),
    ("LOINC", "http://loinc.org"),
    ("RxNorm", "http://www.nlm.nih.gov/research/umls/rxnorm"),
    ("CVX", "http://hl7.org/fhir/sid/cvx"),
];

fn system_uri(short: &str) -> String {
    SYSTEMS
        .iter()
        .find(|(s, _)| *s == short)
        .map(|(_, u)| u.to_string())
        .unwrap_or_else(|| {
            if short.contains(':') {
                short.to_string()
            } else {
                format!("{EXT}/code-system/{short}")
            }
        })
}

fn system_short(uri: &str) -> String {
    if let Some(s) = uri.strip_prefix(&format!("{EXT}/code-system/")) {
        return s.to_string();
    }
    SYSTEMS
        .iter()
        .find(|(_, u)| *u == uri)
        .map(|(s, _)| s.to_string())
        .unwrap_or_else(|| uri.to_string())
}

/// A FHIR id for the chart: the chart id when it is a valid FHIR id short enough to prefix
/// entry ids, else a digest of it. Stable: the same chart always gets the same ids.
pub fn patient_id(chart_id: &str) -> String {
    let ok = chart_id.len() <= 48
        && chart_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        chart_id.to_string()
    } else {
        use sha2::{Digest, Sha256};
        format!(
            "c-{}",
            &hex::encode(Sha256::digest(chart_id.as_bytes()))[..32]
        )
    }
}

fn ext_str(name: &str, v: &str) -> Value {
    json!({ "url": format!("{EXT}/{name}"), "valueString": v })
}

/// Whether `s` is a FHIR instant (a full timestamp with a time zone).
fn is_instant(s: &str) -> bool {
    s.len() > 10 && crate::chart::is_fhir_date(s)
}

fn rfc3339_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// The resource types of FHIR R4 (4.0.1).
pub fn is_r4_resource(rt: &str) -> bool {
    const R4: &[&str] = &[
        "Account",
        "ActivityDefinition",
        "AdverseEvent",
        "AllergyIntolerance",
        "Appointment",
        "AppointmentResponse",
        "AuditEvent",
        "Basic",
        "Binary",
        "BiologicallyDerivedProduct",
        "BodyStructure",
        "Bundle",
        "CapabilityStatement",
        "CarePlan",
        "CareTeam",
        "CatalogEntry",
        "ChargeItem",
        "ChargeItemDefinition",
        "Claim",
        "ClaimResponse",
        "ClinicalImpression",
        "CodeSystem",
        "Communication",
        "CommunicationRequest",
        "CompartmentDefinition",
        "Composition",
        "ConceptMap",
        "Condition",
        "Consent",
        "Contract",
        "Coverage",
        "CoverageEligibilityRequest",
        "CoverageEligibilityResponse",
        "DetectedIssue",
        "Device",
        "DeviceDefinition",
        "DeviceMetric",
        "DeviceRequest",
        "DeviceUseStatement",
        "DiagnosticReport",
        "DocumentManifest",
        "DocumentReference",
        "EffectEvidenceSynthesis",
        "Encounter",
        "Endpoint",
        "EnrollmentRequest",
        "EnrollmentResponse",
        "EpisodeOfCare",
        "EventDefinition",
        "Evidence",
        "EvidenceVariable",
        "ExampleScenario",
        "ExplanationOfBenefit",
        "FamilyMemberHistory",
        "Flag",
        "Goal",
        "GraphDefinition",
        "Group",
        "GuidanceResponse",
        "HealthcareService",
        "ImagingStudy",
        "Immunization",
        "ImmunizationEvaluation",
        "ImmunizationRecommendation",
        "ImplementationGuide",
        "InsurancePlan",
        "Invoice",
        "Library",
        "Linkage",
        "List",
        "Location",
        "Measure",
        "MeasureReport",
        "Media",
        "Medication",
        "MedicationAdministration",
        "MedicationDispense",
        "MedicationKnowledge",
        "MedicationRequest",
        "MedicationStatement",
        "MedicinalProduct",
        "MedicinalProductAuthorization",
        "MedicinalProductContraindication",
        "MedicinalProductIndication",
        "MedicinalProductIngredient",
        "MedicinalProductInteraction",
        "MedicinalProductManufactured",
        "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical",
        "MedicinalProductUndesirableEffect",
        "MessageDefinition",
        "MessageHeader",
        "MolecularSequence",
        "NamingSystem",
        "NutritionOrder",
        "Observation",
        "ObservationDefinition",
        "OperationDefinition",
        "OperationOutcome",
        "Organization",
        "OrganizationAffiliation",
        "Parameters",
        "Patient",
        "PaymentNotice",
        "PaymentReconciliation",
        "Person",
        "PlanDefinition",
        "Practitioner",
        "PractitionerRole",
        "Procedure",
        "Provenance",
        "Questionnaire",
        "QuestionnaireResponse",
        "RelatedPerson",
        "RequestGroup",
        "ResearchDefinition",
        "ResearchElementDefinition",
        "ResearchStudy",
        "ResearchSubject",
        "RiskAssessment",
        "RiskEvidenceSynthesis",
        "Schedule",
        "SearchParameter",
        "ServiceRequest",
        "Slot",
        "Specimen",
        "SpecimenDefinition",
        "StructureDefinition",
        "StructureMap",
        "Subscription",
        "Substance",
        "SubstanceNucleicAcid",
        "SubstancePolymer",
        "SubstanceProtein",
        "SubstanceReferenceInformation",
        "SubstanceSourceMaterial",
        "SubstanceSpecification",
        "SupplyDelivery",
        "SupplyRequest",
        "Task",
        "TerminologyCapabilities",
        "TestReport",
        "TestScript",
        "ValueSet",
        "VerificationResult",
        "VisionPrescription",
    ];
    R4.contains(&rt)
}

/// Audit entries as FHIR AuditEvent resources in a collection Bundle.
pub fn audit_bundle(entries: &[crate::audit::AuditEntry], practice: &str) -> Value {
    let items: Vec<Value> = entries
        .iter()
        .map(|e| {
            let ev = &e.event;
            // R4 action codes: C create, R read, U update, D delete, E execute.
            let action = match ev.action.as_str() {
                "create" | "import" | "sync-receive" => "C",
                "read" | "search" | "export" | "sync-send" | "history" => "R",
                "update" | "share" | "revoke" | "edit" => "U",
                _ => "E",
            };
            let refused = ev.action.starts_with("refuse") || ev.action.contains("refus");
            let mut r = json!({
                "resourceType": "AuditEvent",
                "id": format!("audit-{}", e.seq),
                "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation" },
                "subtype": [{ "system": format!("{EXT}/audit-action"), "code": ev.action }],
                "action": action,
                "recorded": rfc3339_ms(ev.time_ms),
                "outcome": if refused { "4" } else { "0" },
                "agent": [{ "who": { "display": ev.actor }, "requestor": true }],
                "source": { "observer": { "identifier": { "system": format!("{EXT}/practice-id"), "value": practice } } },
                "extension": [ext_str("audit-hash", &e.hash), ext_str("audit-prev-hash", &e.prev_hash)],
            });
            let mut entities = Vec::new();
            for c in ev.chart_id.iter().chain(&ev.charts) {
                entities.push(json!({ "what": { "reference": format!("Patient/{}", patient_id(c)) } }));
            }
            if let Some(p) = &ev.peer {
                entities.push(json!({ "what": { "identifier": { "system": format!("{EXT}/practice-id"), "value": p } }, "role": { "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "3", "display": "Report" } }));
            }
            if let Some(d) = &ev.detail {
                r["outcomeDesc"] = d.clone().into();
            }
            // Listed for one patient: the entry named more charts than the entities here
            // (its hash covers them all; the whole log's export lists every one).
            if let Some(n) = e.charts_named {
                r["extension"]
                    .as_array_mut()
                    .expect("extension array")
                    .push(json!({ "url": format!("{EXT}/audit-charts-named"), "valueInteger": n }));
            }
            if !entities.is_empty() {
                r["entity"] = Value::Array(entities);
            }
            json!({ "fullUrl": export::entry_uuid("audit", &e.seq.to_string()), "resource": r })
        })
        .collect();
    json!({ "resourceType": "Bundle", "type": "collection", "entry": items })
}

#[cfg(test)]
mod tests;
