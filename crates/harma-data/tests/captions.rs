//! Caption cleaning against the ORIGINAL HarMA `pre_caption` on 400 real RSITMD/RSICD captions
//! and edge cases (fixture: tests/fixtures/make_captions.py).

use harma_data::clean_caption;

#[test]
fn cleaning_equals_the_original_pre_caption() -> anyhow::Result<()> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/captions.json");
    let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    assert!(cases.len() >= 400);
    let mut errors = 0;
    for c in &cases {
        let caption = c["caption"].as_str().unwrap();
        let max_words = c["max_words"].as_u64().unwrap() as usize;
        let ours = clean_caption(caption, max_words);
        match c.get("clean") {
            Some(want) => assert_eq!(ours.as_deref(), want.as_str(), "{caption:?}"),
            None => {
                assert_eq!(ours, None, "{caption:?}: the original rejects it");
                errors += 1;
            }
        }
    }
    assert!(errors >= 3, "the fixture covers empty results");
    Ok(())
}
