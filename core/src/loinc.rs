//! Names of common LOINC codes (vital signs and routine laboratory tests), for showing an
//! observation that was recorded with its code only. A display table, not a terminology
//! service: codes not listed here are shown as recorded.

/// The usual name of a LOINC code, when it is one of the common ones.
pub fn name(code: &str) -> Option<&'static str> {
    Some(match code {
        "8480-6" => "Systolic blood pressure",
        "8462-4" => "Diastolic blood pressure",
        "85354-9" => "Blood pressure panel",
        "8867-4" => "Heart rate",
        "9279-1" => "Respiratory rate",
        "8310-5" => "Body temperature",
        "29463-7" => "Body weight",
        "8302-2" => "Body height",
        "39156-5" => "Body mass index",
        "2708-6" | "59408-5" => "Oxygen saturation",
        "4548-4" => "Hemoglobin A1c",
        "718-7" => "Hemoglobin",
        "2345-7" => "Glucose",
        "2160-0" => "Creatinine",
        "33914-3" | "62238-1" => "eGFR",
        "2093-3" => "Cholesterol total",
        "2085-9" => "HDL cholesterol",
        "13457-7" | "18262-6" => "LDL cholesterol",
        "2571-8" => "Triglycerides",
        "3016-3" => "TSH",
        "24467-3" => "CD4 cell count",
        "2823-3" => "Potassium",
        "2951-2" => "Sodium",
        "6690-2" => "Leukocytes",
        "777-3" => "Platelets",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn common_codes_have_names_and_others_none() {
        assert_eq!(super::name("8480-6"), Some("Systolic blood pressure"));
        assert_eq!(super::name("4548-4"), Some("Hemoglobin A1c"));
        assert_eq!(super::name("99999-9"), None);
    }
}
