//! Search results for people and programs: ranked rows with the tile's file, pixel box and,
//! where georeferenced, its box in its CRS; as a table, JSON, or a GeoJSON FeatureCollection.

use serde::Serialize;
use serde_json::{json, Value};

use crate::exact::Hit;
use crate::store::{TileInfo, View};
use crate::{Error, Result};

/// One result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ranked {
    pub rank: usize,
    pub score: f32,
    #[serde(flatten)]
    pub tile: TileInfo,
}

/// The stored tiles of `hits`, ranked from 1, read from the view the hits' vectors came from:
/// each result carries its own tile's row, found by id (a missing one is an error naming it).
pub fn ranked(view: &View, hits: &[Hit]) -> Result<Vec<Ranked>> {
    let ids: Vec<i64> = hits.iter().map(|h| h.id).collect();
    let tiles = view.tiles(&ids)?;
    hits.iter()
        .zip(tiles)
        .enumerate()
        .map(|(i, (h, tile))| {
            if tile.id != h.id {
                return Err(Error::Other(format!(
                    "result {} is tile {} but its row is tile {}",
                    i + 1,
                    h.id,
                    tile.id
                )));
            }
            Ok(Ranked {
                rank: i + 1,
                score: h.score,
                tile,
            })
        })
        .collect()
}

/// Whether `c` is written escaped by [`printable`]: a control character (ESC, BEL, CR, LF,
/// DEL, C1...), a bidirectional override or mark (which reorders what follows on screen), or
/// the backslash that starts an escape (so a literal `\u{1b}` cannot pose as one).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\\'
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every character of [`needs_escape`] written as `\u{..}`: a file name or request
/// target shown on a terminal or written to a log cannot move the cursor, retitle or clear
/// the terminal, reorder the line or start a forged one.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .map(|c| {
                if needs_escape(c) {
                    format!("\\u{{{:x}}}", c as u32)
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// A plain-text table, one line per result (file names made [`printable`]).
pub fn table(results: &[Ranked]) -> String {
    let mut s = format!(
        "{:>4} {:>7}  {:<40} {:<22} {}\n",
        "rank", "score", "file", "tile (x,y wxh)", "box in CRS"
    );
    for r in results {
        let t = &r.tile.tile;
        let geo = match (r.tile.bbox, r.tile.epsg) {
            (Some(b), epsg) => format!(
                "[{:.3}, {:.3}, {:.3}, {:.3}] {}",
                b[0],
                b[1],
                b[2],
                b[3],
                epsg.map_or("(no EPSG code)".to_string(), |e| format!("EPSG:{e}"))
            ),
            (None, _) => "-".into(),
        };
        s += &format!(
            "{:>4} {:>7.4}  {:<40} {:<22} {}\n",
            r.rank,
            r.score,
            printable(&r.tile.file),
            format!("{},{} {}x{}", t.x, t.y, t.w, t.h),
            geo
        );
    }
    s
}

/// How `--geojson` writes a tile's box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeoJsonCrs {
    /// RFC 7946: WGS84 longitude/latitude, the box's corners reprojected from its CRS (what
    /// web maps, geojson.io, DuckDB and GeoPandas read); the native box and EPSG code are
    /// properties.
    Wgs84,
    /// The raster's own CRS, named in a `crs` member (the 2008 GeoJSON form, which GDAL and so
    /// QGIS read).
    Native,
}

/// A GeoJSON FeatureCollection: each result a Polygon (its box) with its rank, score, file,
/// pixel box, native box and EPSG code as properties; results without georeferencing (or whose
/// CRS cannot be reprojected, the reason in `reprojection_error`) have a null geometry.
pub fn geojson(results: &[Ranked], crs: GeoJsonCrs) -> Value {
    match crs {
        GeoJsonCrs::Native => geojson_native(results),
        GeoJsonCrs::Wgs84 => geojson_wgs84(results),
    }
}

/// The properties every feature carries.
fn properties(r: &Ranked) -> serde_json::Map<String, Value> {
    let t = &r.tile;
    let v = json!({
        "rank": r.rank,
        "score": r.score,
        "tile_id": t.id,
        "file": t.file,
        "x": t.tile.x, "y": t.tile.y, "w": t.tile.w, "h": t.tile.h,
        "edge": t.tile.edge,
        "epsg": t.epsg,
        "bbox": t.bbox,
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("an object"),
    }
}

fn geojson_wgs84(results: &[Ranked]) -> Value {
    let mut projections = Wgs84Corners::default();
    let features: Vec<Value> = results
        .iter()
        .map(|r| {
            let t = &r.tile;
            let mut props = properties(r);
            let geometry = match (t.bbox, t.epsg) {
                (Some(bbox), Some(epsg)) => match projections.corners(bbox, epsg) {
                    Ok(ring) => json!({ "type": "Polygon", "coordinates": [ring] }),
                    Err(e) => {
                        props.insert("reprojection_error".into(), e.into());
                        Value::Null
                    }
                },
                (Some(_), None) => {
                    props.insert(
                        "reprojection_error".into(),
                        "the raster's CRS has no EPSG code".into(),
                    );
                    Value::Null
                }
                _ => Value::Null,
            };
            json!({ "type": "Feature", "id": t.id, "geometry": geometry, "properties": props })
        })
        .collect();
    json!({ "type": "FeatureCollection", "features": features })
}

/// Boxes to WGS84 corners, each CRS's projection made once.
#[derive(Default)]
pub struct Wgs84Corners {
    made: std::collections::HashMap<u32, std::result::Result<proj4rs::Proj, String>>,
    wgs84: Option<proj4rs::Proj>,
}

impl Wgs84Corners {
    /// The corners of `bbox` (min x, min y, max x, max y in EPSG:`epsg`) as WGS84 longitude
    /// and latitude in degrees: a closed ring, counter-clockwise as RFC 7946 asks of exterior
    /// rings (for a north-up box).
    pub fn corners(
        &mut self,
        bbox: [f64; 4],
        epsg: u32,
    ) -> std::result::Result<Vec<[f64; 2]>, String> {
        use proj4rs::Proj;
        let src = self
            .made
            .entry(epsg)
            .or_insert_with(|| {
                u16::try_from(epsg)
                    .map_err(|_| format!("EPSG:{epsg} is not a known code"))
                    .and_then(|c| {
                        Proj::from_epsg_code(c)
                            .map_err(|e| format!("EPSG:{epsg} cannot be reprojected: {e}"))
                    })
            })
            .as_ref()
            .map_err(|e| e.clone())?;
        let dst = self.wgs84.get_or_insert_with(|| {
            Proj::from_epsg_code(4326).expect("EPSG:4326 is among the definitions")
        });
        let [x0, y0, x1, y1] = bbox;
        let mut ring = Vec::with_capacity(5);
        for (x, y) in [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)] {
            // geographic coordinates go in and come out in radians
            let mut p = if src.is_latlong() {
                (x.to_radians(), y.to_radians())
            } else {
                (x, y)
            };
            proj4rs::transform::transform(src, dst, &mut p)
                .map_err(|e| format!("EPSG:{epsg} ({x}, {y}) cannot be reprojected: {e}"))?;
            let (lon, lat) = (p.0.to_degrees(), p.1.to_degrees());
            if !(lon.is_finite() && lat.is_finite()) {
                return Err(format!("EPSG:{epsg} ({x}, {y}) has no place on the globe"));
            }
            ring.push([lon, lat]);
        }
        Ok(ring)
    }
}

/// The 2008 form: coordinates in the raster's CRS, named in a `crs` member when every
/// georeferenced result shares one EPSG code; results in another CRS than the first's get a
/// null geometry, their box in properties.
fn geojson_native(results: &[Ranked]) -> Value {
    let crs = results
        .iter()
        .find(|r| r.tile.bbox.is_some())
        .map(|r| r.tile.epsg);
    let features: Vec<Value> = results
        .iter()
        .map(|r| {
            let t = &r.tile;
            let geometry = match t.bbox {
                Some([x0, y0, x1, y1]) if Some(t.epsg) == crs => json!({
                    "type": "Polygon",
                    "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                }),
                _ => Value::Null,
            };
            json!({
                "type": "Feature",
                "id": t.id,
                "geometry": geometry,
                "properties": properties(r),
            })
        })
        .collect();
    let mut fc = json!({ "type": "FeatureCollection", "features": features });
    if let Some(Some(epsg)) = crs {
        fc["crs"] = json!({ "type": "name", "properties": { "name": format!("EPSG:{epsg}") } });
    }
    fc
}

#[cfg(test)]
mod tests {
    use super::*;
    use harma_raster::Tile;

    fn r(rank: usize, bbox: Option<[f64; 4]>, epsg: Option<u32>) -> Ranked {
        Ranked {
            rank,
            score: 0.5,
            tile: TileInfo {
                id: rank as i64,
                file: format!("f{rank}.tif"),
                tile: Tile {
                    x: 0,
                    y: 256,
                    w: 256,
                    h: 256,
                    edge: 0,
                },
                bbox,
                epsg,
            },
        }
    }

    #[test]
    fn geojson_boxes_in_one_crs() {
        let fc = geojson_native(&[
            r(1, Some([10.0, 20.0, 30.0, 40.0]), Some(32633)),
            r(2, None, None),
            r(3, Some([0.0, 0.0, 1.0, 1.0]), Some(4326)),
        ]);
        assert_eq!(fc["crs"]["properties"]["name"], "EPSG:32633");
        let f = fc["features"].as_array().unwrap();
        assert_eq!(
            f[0]["geometry"]["coordinates"][0],
            json!([
                [10.0, 20.0],
                [30.0, 20.0],
                [30.0, 40.0],
                [10.0, 40.0],
                [10.0, 20.0]
            ])
        );
        assert!(f[1]["geometry"].is_null() && f[2]["geometry"].is_null());
        assert_eq!(f[2]["properties"]["epsg"], 4326);
        assert_eq!(f[0]["properties"]["y"], 256);
        let t = table(&[r(1, Some([10.0, 20.0, 30.0, 40.0]), Some(32633))]);
        assert!(
            t.contains("EPSG:32633") && t.contains("0,256 256x256"),
            "{t}"
        );
    }

    /// A file name with terminal escapes and line breaks prints as one inert line.
    #[test]
    fn control_characters_in_names_are_escaped() {
        let mut hostile = r(1, None, None);
        hostile.tile.file = "a\u{1b}]0;owned\u{7}b\nforged 1.0000 row\r\u{9b}2J.png".into();
        let t = table(&[hostile]);
        assert_eq!(t.lines().count(), 2, "{t}");
        assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
        assert!(
            t.contains("a\\u{1b}]0;owned\\u{7}b\\u{a}forged 1.0000 row\\u{d}\\u{9b}2J.png"),
            "{t}"
        );
        assert_eq!(printable("plain name.tif"), "plain name.tif");
        assert_eq!(printable("a\\b\u{202e}c"), "a\\u{5c}b\\u{202e}c");
    }
}
