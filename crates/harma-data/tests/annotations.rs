//! Annotation loaders: HarMA's real RSITMD test file, and every bad-input case naming its entry.

use std::path::{Path, PathBuf};

use harma_data::annotations::{load_eval_json, load_pairs, load_train_json, LoadOptions};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("harma-ann-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn real_rsitmd_test_split_loads() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/annotations/rsitmd_test.json");
    let set = load_eval_json(&path, &LoadOptions::default()).unwrap();
    assert_eq!((set.images.len(), set.captions.len()), (452, 2260));
    assert!(set.txt2img.iter().enumerate().all(|(j, &i)| i == j / 5));
    assert!(set
        .captions
        .iter()
        .all(|c| c == &c.to_lowercase() && !c.contains(',')));
}

#[test]
fn train_entries_group_by_image_id_and_bad_ones_are_named() {
    let dir = temp_dir("train");
    let good = write(
        &dir,
        "train.json",
        r#"[
        {"caption": "Two planes.", "image": "a.tif", "image_id": 7, "label_name": "x", "label": 0},
        {"caption": "A plane!", "image": "a.tif", "image_id": 7},
        {"caption": "A road", "image": "b.tif", "image_id": 9}]"#,
    );
    let set = load_train_json(&good, &LoadOptions::default()).unwrap();
    assert_eq!(set.image_ids, vec![7, 7, 9]);
    assert_eq!(set.captions, vec!["two planes", "a plane", "a road"]);

    let badf = write(
        &dir,
        "bad.json",
        r#"[
        {"caption": "ok", "image": "a.tif", "image_id": 1},
        {"image": "b.tif", "image_id": 2},
        {"caption": "?!", "image": "c.tif", "image_id": 3},
        {"caption": "again", "image": "a.tif", "image_id": 5}]"#,
    );
    let err = load_train_json(&badf, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.json") && err.contains("entry 1: missing field `caption`"),
        "{err}"
    );
    let opts = LoadOptions {
        skip_bad: true,
        ..LoadOptions::default()
    };
    let set = load_train_json(&badf, &opts).unwrap();
    assert_eq!(set.captions, vec!["ok"]);
    assert_eq!(set.skipped.len(), 3);
    assert!(set.skipped[1].contains("entry 2") && set.skipped[1].contains("empty after cleaning"));
    assert!(
        set.skipped[2].contains("image_id 5 here and 1"),
        "{:?}",
        set.skipped
    );

    let broken = write(&dir, "broken.json", "[{\"caption\": ");
    let err = load_train_json(&broken, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("broken.json") && err.contains("not valid JSON"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn eval_duplicates_and_missing_images_are_named() {
    let dir = temp_dir("eval");
    std::fs::write(dir.join("a.tif"), b"x").unwrap();
    let f = write(
        &dir,
        "test.json",
        r#"[
        {"image": "a.tif", "caption": ["one", "two"]},
        {"image": "a.tif", "caption": ["three"]}]"#,
    );
    let err = load_eval_json(&f, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("entry 1: image a.tif is listed again (first in entry 0)"),
        "{err}"
    );
    let g = write(
        &dir,
        "test2.json",
        r#"[
        {"image": "a.tif", "caption": ["one"]}, {"image": "gone.tif", "caption": ["two"]}]"#,
    );
    let opts = LoadOptions {
        image_root: Some(dir.clone()),
        ..LoadOptions::default()
    };
    let err = load_eval_json(&g, &opts).unwrap_err().to_string();
    assert!(
        err.contains("entry 1") && err.contains("gone.tif not found"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn user_csv_and_jsonl_pairs() {
    let dir = temp_dir("pairs");
    let csv = write(
        &dir,
        "pairs.csv",
        "image,caption\nx/1.png,A lake.\nx/2.png,\"Roads, and \"\"cars\"\"\"\nx/1.png,Water\n",
    );
    let set = load_pairs(&csv, &LoadOptions::default()).unwrap();
    assert_eq!(set.image_ids, vec![0, 1, 0]);
    assert_eq!(set.captions, vec!["a lake", "roads and cars", "water"]);
    let jsonl = write(
        &dir,
        "pairs.jsonl",
        "{\"image\": \"a.jpg\", \"caption\": \"A farm\"}\n\n{\"image\": \"b.jpg\"}\n",
    );
    let err = load_pairs(&jsonl, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pairs.jsonl: line 3: missing field `caption`"),
        "{err}"
    );
    let bad_csv = write(&dir, "bad.csv", "just-one-column\n");
    let err = load_pairs(&bad_csv, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 1: expected `image,caption`"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn user_pairs_as_an_evaluation_split_group_by_image() {
    let dir = temp_dir("evalpairs");
    let csv = write(
        &dir,
        "val.csv",
        "image,caption\nb.tif,A boat.\na.tif,A field.\nb.tif,\"Two boats, moored.\"\nc.tif,Roads\na.tif,Crops\n",
    );
    let set = harma_data::annotations::load_evaluation(&csv, &LoadOptions::default()).unwrap();
    let images: Vec<&str> = set.images.iter().map(|p| p.to_str().unwrap()).collect();
    assert_eq!(images, ["b.tif", "a.tif", "c.tif"]);
    assert_eq!(
        set.captions,
        ["a boat", "two boats moored", "a field", "crops", "roads"]
    );
    assert_eq!(set.txt2img, [0, 0, 1, 1, 2]);
    // HarMA's JSON goes through the JSON loader
    let json = write(
        &dir,
        "t.json",
        r#"[{"image": "x.tif", "caption": ["One.", "Two."]}]"#,
    );
    let set = harma_data::annotations::load_evaluation(&json, &LoadOptions::default()).unwrap();
    assert_eq!(
        (set.images.len(), set.txt2img.as_slice()),
        (1, [0, 0].as_slice())
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn image_names_lists_both_formats_without_checking_images_or_captions() {
    use harma_data::annotations::image_names;
    let dir = temp_dir("names");
    let train = write(
        &dir,
        "train.json",
        r#"[{"caption": "", "image": "train/a.tif", "image_id": 0},
            {"caption": "b", "image": "train/a.tif", "image_id": 0},
            {"caption": "c", "image": "../x.tif", "image_id": 1}]"#,
    );
    // empty captions and names that point anywhere are listed as they are: judging them is
    // the caller's business
    assert_eq!(
        image_names(&train).unwrap(),
        ["train/a.tif", "train/a.tif", "../x.tif"]
    );
    let real =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/annotations/rsitmd_test.json");
    let names = image_names(&real).unwrap();
    let set = load_eval_json(&real, &LoadOptions::default()).unwrap();
    assert_eq!(names.len(), 452);
    assert!(names
        .iter()
        .zip(&set.images)
        .all(|(n, p)| Path::new(n) == p));
    for (text, want) in [
        (
            r#"[{"image": "a.tif"}, {"caption": ["x"]}]"#,
            "entry 1: missing field `image`",
        ),
        (r#"[{"image": 3}]"#, "entry 0: `image` is not a string"),
        (r#"{"image": "a.tif"}"#, "expected a JSON list"),
        ("[{", "not valid JSON"),
    ] {
        let p = write(&dir, "bad.json", text);
        let err = image_names(&p).unwrap_err().to_string();
        assert!(
            err.contains("bad.json") && err.contains(want),
            "{text}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
