use super::*;

const GOOD: &str = r#"{"id":"chart-1","type":"chart","schemaVersion":1,"practiceId":"p","patient":{"mrn":"M1","name":{"given":["A"],"family":"B"},"birthDate":"2010-12-11","sex":"male"},"conditions":[],"allergies":[],"medications":[],"observations":[{"code":"8480-6","value":131,"date":"2023-05-01T09:12:00Z"}],"notes":[],"immunizations":[],"createdAt":"2021-07-03T11:45:00Z","updatedAt":"2025-02-14T16:05:00Z"}"#;

fn err(s: &str) -> ValidationError {
    Chart::from_json_slice(s.as_bytes()).unwrap_err()
}

#[test]
fn a_good_chart_parses() {
    let c = Chart::from_json_slice(GOOD.as_bytes()).unwrap();
    assert_eq!(c.id, "chart-1");
    assert_eq!(
        c.observations[0].value.as_ref().unwrap().as_i64(),
        Some(131)
    );
    assert_eq!(c.required_version(), 1);
}

#[test]
fn errors_name_the_field() {
    let e = err(&GOOD.replace("\"2010-12-11\"", "\"2010-13-11\""));
    assert_eq!(e.field, "patient.birthDate");
    let e = err(&GOOD.replace("\"value\":131", "\"value\":\"high\""));
    assert_eq!(e.field, "observations[0].value", "{e}");
    let e = err(&GOOD.replace("\"mrn\":\"M1\",", ""));
    assert!(e.to_string().contains("mrn"), "{e}");
    let e = err(&GOOD.replace("\"id\":\"chart-1\",", ""));
    assert!(e.to_string().contains("`id`"), "{e}");
    let e = err(&GOOD[..GOOD.len() - 20]);
    assert!(e.message.contains("truncated"), "{e}");
    let e = err(&GOOD.replace("\"sex\":\"male\"", "\"sex\":\"m\""));
    assert_eq!(e.field, "patient.sex");
    let e = err(&GOOD.replace("\"schemaVersion\":1", "\"schemaVersion\":3"));
    assert_eq!(e.field, "schemaVersion");
    let e = err(&GOOD.replace("\"practiceId\"", "\"practiceID\""));
    assert!(e.message.contains("unknown field"), "{e}");
    let mut bad = GOOD.as_bytes().to_vec();
    bad[30] = 0xff;
    assert!(
        Chart::from_json_slice(&bad)
            .unwrap_err()
            .message
            .contains("UTF-8")
    );
}

#[test]
fn decimals_keep_the_text_they_were_written_with() {
    for v in ["1.20", "97.45878396789", "0.1", "1e3", "-0.000120", "131"] {
        let c = Chart::from_json_slice(
            GOOD.replace("\"value\":131", &format!("\"value\":{v}"))
                .as_bytes(),
        )
        .unwrap();
        let value = c.observations[0].value.as_ref().unwrap();
        assert_eq!(value.as_str(), v);
        let back = serde_json::to_string(&c).unwrap();
        assert!(back.contains(&format!("\"value\":{v}")), "{back}");
    }
    assert!(Decimal::parse("1.2.3").is_err());
    assert!(Decimal::parse("1e999").is_err());
    assert!(Decimal::parse("01").is_err());
    // Read from a JSON value (a received document), a decimal is still a number.
    let v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
    let c = Chart::from_json_value(v).unwrap();
    assert_eq!(c.observations[0].value.as_ref().unwrap().as_str(), "131");
}

#[test]
fn a_version_1_record_with_a_version_2_field_is_refused_naming_it() {
    let v2 = GOOD.replace(
        "\"sex\":\"male\"",
        "\"sex\":\"male\",\"deceasedDate\":\"2008-02\"",
    );
    let e = err(&v2);
    assert_eq!(e.field, "patient.deceased", "{e}");
    assert!(e.message.contains("schemaVersion 2"), "{e}");
    let c = Chart::from_json_slice(
        v2.replace("\"schemaVersion\":1", "\"schemaVersion\":2")
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(c.required_version(), 2);
    assert!(c.patient.is_deceased());
    // A partial date is a version 2 value.
    let e = err(&GOOD.replace("\"2023-05-01T09:12:00Z\"", "\"2023-05\""));
    assert_eq!(e.field, "observations[0].date");
    assert!(e.message.contains("schemaVersion 2"), "{e}");
}

#[test]
fn dates_of_every_fhir_precision_are_accepted_in_version_2_and_nonsense_is_not() {
    for d in [
        "2011",
        "2011-05",
        "2011-05-04",
        "2011-05-04T10:00:00+02:00",
        "2011-05-04T10:00:00.123Z",
    ] {
        assert!(is_fhir_date(d), "{d}");
    }
    for d in [
        "11",
        "2011-13",
        "2011-02-30",
        "2011-05-04T10:00",
        "yesterday",
        "0000",
        "",
    ] {
        assert!(!is_fhir_date(d), "{d}");
    }
}

fn with_family(family: &str) -> String {
    GOOD.replace(
        "\"family\":\"B\"",
        &format!("\"family\":{}", serde_json::to_string(family).unwrap()),
    )
}

#[test]
fn control_characters_and_bidi_controls_are_refused_naming_the_field() {
    for (bad, what) in [
        ("B\u{0}x", "NUL"),
        ("B\u{1b}[31mx", "escape"),
        ("B\nx", "line break"),
        ("B\rx", "carriage return"),
        ("B\u{202e}x", "U+202E"),
        ("B\u{2066}x", "U+2066"),
        ("B\u{85}x", "U+0085"),
    ] {
        let e = err(&with_family(bad));
        assert_eq!(e.field, "patient.name.family", "{bad:?}: {e}");
        assert!(e.message.contains(what), "{bad:?}: {e}");
    }
    // Newlines and tabs are fine in a note; a carriage return or ESC is not.
    let note = |text: &str| {
        GOOD.replace(
            "\"notes\":[]",
            &format!(
                "\"notes\":[{{\"id\":\"n1\",\"author\":\"Dr A\",\"date\":\"2024-01-01T00:00:00Z\",\"text\":{}}}]",
                serde_json::to_string(text).unwrap()
            ),
        )
    };
    assert!(Chart::from_json_slice(note("line one\n\tline two ünïcode").as_bytes()).is_ok());
    let e = err(&note("a\r\nb"));
    assert_eq!(e.field, "notes[0].text");
    let e = err(&note("a\u{1b}b"));
    assert_eq!(e.field, "notes[0].text");
}

#[test]
fn free_text_is_bounded_with_a_clear_error() {
    let e = err(&with_family(&"x".repeat(MAX_LINE_CHARS + 1)));
    assert_eq!(e.field, "patient.name.family");
    assert!(e.message.contains("over the limit of 500"), "{e}");
    assert!(Chart::from_json_slice(with_family(&"é".repeat(MAX_LINE_CHARS)).as_bytes()).is_ok());
    let note = Entry::Note(Note {
        id: "n".into(),
        author: "a".into(),
        date: "2024-01-01T00:00:00Z".into(),
        text: "x".repeat(MAX_NOTE_BYTES + 1),
        ..Default::default()
    });
    let e = note.validate("notes").unwrap_err();
    assert_eq!(e.field, "notes.text");
    assert!(e.message.contains("limit of 102400 bytes"), "{e}");
}

#[test]
fn status_and_negation_decide_what_an_entry_means() {
    let cond = |status: Option<&str>, verification: Option<&str>| Condition {
        code: "I10".into(),
        status: status.map(str::to_string),
        verification: verification.map(str::to_string),
        ..Default::default()
    };
    assert!(cond(None, None).is_active());
    assert!(cond(Some("active"), Some("confirmed")).is_active());
    assert!(!cond(Some("active"), Some("refuted")).is_active());
    assert!(!cond(Some("active"), Some("entered-in-error")).is_active());
    assert!(!cond(Some("resolved"), None).is_active());
    let med = Medication {
        name: "Warfarin".into(),
        status: Some("active".into()),
        do_not_perform: true,
        ..Default::default()
    };
    assert!(!med.is_active() && !med.is_fact());
    let imm = Immunization {
        vaccine: "Flu".into(),
        date: "2024-01-01".into(),
        status: Some("not-done".into()),
        ..Default::default()
    };
    assert!(!imm.was_given());
    let obs = Observation {
        code: "2339-0".into(),
        value: Some(400.into()),
        date: "2024-01-01".into(),
        status: Some("entered-in-error".into()),
        ..Default::default()
    };
    assert!(!obs.is_evidence());
    let allergy = Allergy {
        substance: "Penicillin".into(),
        verification: Some("refuted".into()),
        ..Default::default()
    };
    assert!(!allergy.is_active());
}
