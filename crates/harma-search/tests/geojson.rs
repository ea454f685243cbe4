//! `harma search --geojson` is RFC 7946: WGS84 longitude/latitude. Each tile box's corners,
//! reprojected by proj4rs from its EPSG code, against PROJ's (pyproj, in the fixture written by
//! tests/fixtures/geo/make_corners.py) for UTM north and south, the Antarctic and the NSIDC
//! north polar stereographic, the British National Grid, Lambert-93 and EPSG:4326 itself.

use harma_search::output::{geojson, GeoJsonCrs, Ranked, Wgs84Corners};
use harma_search::store::TileInfo;

fn fixture() -> serde_json::Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/geo/corners.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A fixture box's `bbox` (min x, min y, max x, max y).
fn bbox_of(b: &serde_json::Value) -> [f64; 4] {
    let v: Vec<f64> = b["bbox"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    v.try_into().expect("four numbers")
}

/// Metres on the ground between two lon/lat points (a sphere of the WGS84 semi-major axis is
/// close enough to judge centimetres).
fn metres(a: [f64; 2], b: [f64; 2]) -> f64 {
    let r = 6_378_137.0;
    let (la, lb) = (a[1].to_radians(), b[1].to_radians());
    let dlon = (b[0] - a[0]).to_radians() * ((la + lb) / 2.0).cos();
    r * dlon.hypot(lb - la)
}

#[test]
fn corners_equal_projs_in_every_kind_of_crs() {
    let f = fixture();
    let mut corners = Wgs84Corners::default();
    for b in f["boxes"].as_array().unwrap() {
        let epsg = b["epsg"].as_u64().unwrap() as u32;
        let bbox = bbox_of(b);
        let ring = corners
            .corners(bbox, epsg)
            .unwrap_or_else(|e| panic!("{}: {e}", b["what"]));
        assert_eq!(ring.len(), 5);
        assert_eq!(ring[0], ring[4], "closed");
        // a centimetre of PROJ's corner, whatever the operation (measured: under 0.1 mm for
        // the projections, 3 mm for the British grid's 7-parameter datum shift)
        let tolerance = 0.01;
        let mut worst = 0f64;
        for (ours, theirs) in ring.iter().zip(b["corners"].as_array().unwrap()) {
            let theirs = [theirs[0].as_f64().unwrap(), theirs[1].as_f64().unwrap()];
            worst = worst.max(metres(*ours, theirs));
        }
        eprintln!(
            "EPSG:{epsg} ({}): {worst:.4} m from PROJ's {}",
            b["what"], b["pipeline"]
        );
        assert!(
            worst <= tolerance,
            "EPSG:{epsg}: {worst} m (tolerance {tolerance} m)"
        );
        // counter-clockwise (RFC 7946's exterior rings): positive signed area in lon/lat
        let area: f64 = ring
            .windows(2)
            .map(|w| w[0][0] * w[1][1] - w[1][0] * w[0][1])
            .sum();
        assert!(area > 0.0, "EPSG:{epsg}: clockwise");
    }
}

#[test]
fn the_collection_is_rfc_7946_with_the_native_box_kept() {
    let f = fixture();
    let b = &f["boxes"][2];
    let bbox = bbox_of(b);
    let tile = |id: i64, bbox: Option<[f64; 4]>, epsg: Option<u32>| Ranked {
        rank: id as usize,
        score: 0.5,
        tile: TileInfo {
            id,
            file: format!("f{id}.tif"),
            tile: harma_raster::Tile {
                x: 0,
                y: 0,
                w: 256,
                h: 256,
                edge: 0,
            },
            bbox,
            epsg,
        },
    };
    let native = bbox;
    let fc = geojson(
        &[
            tile(1, Some(native), Some(32725)),
            tile(2, None, None),
            tile(3, Some(native), None),
            tile(4, Some(native), Some(99999)),
        ],
        GeoJsonCrs::Wgs84,
    );
    assert!(fc.get("crs").is_none(), "RFC 7946 has no crs member");
    let feats = fc["features"].as_array().unwrap();
    let ring = feats[0]["geometry"]["coordinates"][0].as_array().unwrap();
    let lon = ring[0][0].as_f64().unwrap();
    let lat = ring[0][1].as_f64().unwrap();
    // UTM 25S: west of Greenwich, south of the equator, in degrees (not 288776 m)
    assert!(
        (-37.0..-32.0).contains(&lon) && (-11.0..-9.0).contains(&lat),
        "{lon} {lat}"
    );
    assert_eq!(feats[0]["properties"]["epsg"], 32725);
    assert_eq!(feats[0]["properties"]["bbox"][0], bbox[0]);
    assert!(
        feats[1]["geometry"].is_null()
            && feats[1]["properties"].get("reprojection_error").is_none()
    );
    for (i, why) in [(2, "no EPSG code"), (3, "EPSG:99999")] {
        assert!(feats[i]["geometry"].is_null());
        let e = feats[i]["properties"]["reprojection_error"]
            .as_str()
            .unwrap();
        assert!(e.contains(why), "{e}");
    }
    // the native form keeps the CRS member and the metres
    let n = geojson(&[tile(1, Some(native), Some(32725))], GeoJsonCrs::Native);
    assert_eq!(n["crs"]["properties"]["name"], "EPSG:32725");
    assert_eq!(
        n["features"][0]["geometry"]["coordinates"][0][0][0],
        bbox[0]
    );
}
