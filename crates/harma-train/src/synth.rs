//! A procedurally generated remote-sensing-like image-caption set for the offline demo and the
//! end-to-end tests: top-down scenes of land cover (farmland, forest, desert, grassland,
//! residential blocks) with water (a river or a lake), roads and buildings, each with five
//! captions generated from the scene's content and layout, written in HarMA's annotation
//! format (train: one entry per caption with an `image_id`; val/test: five captions per image).
//! Everything is drawn from a seed, so a set is reproducible.

use std::path::Path;

use harma_data::rng::Rng;
use harma_data::{Error, Result, RgbImage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ground {
    Farmland,
    Forest,
    Desert,
    Grassland,
    Residential,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Top,
    Centre,
    Bottom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Water {
    None,
    /// a river crossing the scene, horizontal or vertical
    River {
        vertical: bool,
    },
    Lake(Place),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Road {
    None,
    Straight { vertical: bool },
    Crossing,
}

/// What a scene shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scene {
    pub ground: Ground,
    pub water: Water,
    pub road: Road,
    /// 0 to 4 buildings
    pub buildings: usize,
    /// index into [`BUILDING_COLOURS`]
    pub colour: usize,
}

pub const BUILDING_COLOURS: [(&str, [u8; 3]); 3] = [
    ("red", [190, 50, 40]),
    ("white", [235, 235, 230]),
    ("blue", [60, 90, 200]),
];

fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.below(items.len())]
}

impl Scene {
    pub fn random(rng: &mut Rng) -> Self {
        use Ground::*;
        let ground = pick(rng, &[Farmland, Forest, Desert, Grassland, Residential]);
        let water = match rng.below(3) {
            0 => Water::None,
            1 => Water::River {
                vertical: rng.below(2) == 1,
            },
            _ => Water::Lake(pick(rng, &[Place::Top, Place::Centre, Place::Bottom])),
        };
        let road = match rng.below(3) {
            0 => Road::None,
            1 => Road::Straight {
                vertical: rng.below(2) == 1,
            },
            _ => Road::Crossing,
        };
        Self {
            ground,
            water,
            road,
            buildings: rng.below(5),
            colour: rng.below(BUILDING_COLOURS.len()),
        }
    }

    /// Draw the scene at `size` x `size`; `rng` adds texture and places objects.
    pub fn render(&self, size: usize, rng: &mut Rng) -> RgbImage {
        let mut img = RgbImage {
            width: size,
            height: size,
            data: vec![0; size * size * 3],
        };
        let s = size as f64;
        // ground texture
        let stripe = 3 + rng.below(4);
        let diagonal = rng.below(2) == 1;
        for y in 0..size {
            for x in 0..size {
                let noise = rng.range(-12.0, 12.0);
                let c = match self.ground {
                    Ground::Farmland => {
                        let k = if diagonal { x + y } else { x } / stripe;
                        if k.is_multiple_of(2) {
                            [110.0, 160.0, 60.0]
                        } else {
                            [200.0, 180.0, 90.0]
                        }
                    }
                    Ground::Forest => {
                        let blob = ((x as f64 * 0.7).sin() * (y as f64 * 0.9).cos()) * 20.0;
                        [30.0 + blob, 85.0 + blob, 35.0]
                    }
                    Ground::Desert => [205.0, 180.0, 130.0],
                    Ground::Grassland => [130.0, 185.0, 95.0],
                    Ground::Residential => {
                        if x % 12 < 2 || y % 12 < 2 {
                            [120.0, 120.0, 120.0]
                        } else {
                            [170.0, 150.0, 140.0]
                        }
                    }
                };
                let c = c.map(|v| (v + noise).clamp(0.0, 255.0) as u8);
                img.data[(y * size + x) * 3..][..3].copy_from_slice(&c);
            }
        }
        let fill = |img: &mut RgbImage, inside: &dyn Fn(f64, f64) -> bool, c: [u8; 3]| {
            for y in 0..size {
                for x in 0..size {
                    if inside(x as f64 + 0.5, y as f64 + 0.5) {
                        img.data[(y * size + x) * 3..][..3].copy_from_slice(&c);
                    }
                }
            }
        };
        let water = [40, 80, 170];
        match self.water {
            Water::None => {}
            Water::River { vertical } => {
                let at = rng.range(0.3, 0.7) * s;
                let w = 0.12 * s;
                let wave = rng.range(0.0, 6.0);
                fill(
                    &mut img,
                    &|x, y| {
                        let (along, across) = if vertical { (y, x) } else { (x, y) };
                        (across - at - 3.0 * (along / s * 6.0 + wave).sin()).abs() < w / 2.0
                    },
                    water,
                );
            }
            Water::Lake(place) => {
                let cy = match place {
                    Place::Top => 0.22,
                    Place::Centre => 0.5,
                    Place::Bottom => 0.78,
                } * s;
                let cx = rng.range(0.35, 0.65) * s;
                let (rx, ry) = (rng.range(0.14, 0.22) * s, rng.range(0.1, 0.16) * s);
                fill(
                    &mut img,
                    &|x, y| ((x - cx) / rx).powi(2) + ((y - cy) / ry).powi(2) < 1.0,
                    water,
                );
            }
        }
        let grey = [95, 95, 100];
        let rw = 0.07 * s;
        let (hy, vx) = (rng.range(0.3, 0.7) * s, rng.range(0.3, 0.7) * s);
        match self.road {
            Road::None => {}
            Road::Straight { vertical: true } => {
                fill(&mut img, &|x, _| (x - vx).abs() < rw / 2.0, grey)
            }
            Road::Straight { vertical: false } => {
                fill(&mut img, &|_, y| (y - hy).abs() < rw / 2.0, grey)
            }
            Road::Crossing => fill(
                &mut img,
                &|x, y| (x - vx).abs() < rw / 2.0 || (y - hy).abs() < rw / 2.0,
                grey,
            ),
        }
        let colour = BUILDING_COLOURS[self.colour].1;
        for _ in 0..self.buildings {
            let (w, h) = (rng.range(0.1, 0.16) * s, rng.range(0.1, 0.16) * s);
            let (x0, y0) = (rng.range(0.05, 0.95) * s - w, rng.range(0.05, 0.95) * s - h);
            let (x0, y0) = (x0.max(1.0), y0.max(1.0));
            fill(
                &mut img,
                &|x, y| x >= x0 - 1.0 && x < x0 + w + 1.0 && y >= y0 - 1.0 && y < y0 + h + 1.0,
                [40, 40, 40],
            );
            fill(
                &mut img,
                &|x, y| x >= x0 && x < x0 + w && y >= y0 && y < y0 + h,
                colour,
            );
        }
        img
    }

    /// Five captions describing the scene, each from a different template.
    pub fn captions(&self, rng: &mut Rng) -> Vec<String> {
        let ground = match self.ground {
            Ground::Farmland => pick(rng, &["farmland", "fields of crops", "farm fields"]),
            Ground::Forest => pick(rng, &["a forest", "dense woods", "a wooded area"]),
            Ground::Desert => pick(rng, &["a desert", "bare sandy land", "a dry desert"]),
            Ground::Grassland => pick(rng, &["grassland", "a green meadow", "open grass"]),
            Ground::Residential => pick(rng, &["a residential area", "housing blocks", "a town"]),
        };
        let water = match self.water {
            Water::None => None,
            Water::River { vertical } => Some(format!(
                "a river running {}",
                if vertical {
                    "from top to bottom"
                } else {
                    "from left to right"
                }
            )),
            Water::Lake(p) => Some(format!(
                "a lake {}",
                match p {
                    Place::Top => "at the top",
                    Place::Centre => "in the middle",
                    Place::Bottom => "at the bottom",
                }
            )),
        };
        let road = match self.road {
            Road::None => None,
            Road::Straight { vertical: true } => Some("a vertical road".to_string()),
            Road::Straight { vertical: false } => Some("a horizontal road".to_string()),
            Road::Crossing => Some("two roads crossing".to_string()),
        };
        let colour = BUILDING_COLOURS[self.colour].0;
        let buildings = match self.buildings {
            0 => None,
            1 => Some(format!("one {colour} building")),
            n => Some(format!(
                "{} {colour} buildings",
                ["", "", "two", "three", "four"][n]
            )),
        };
        let parts: Vec<&String> = [&water, &road, &buildings].into_iter().flatten().collect();
        let list = |items: &[&String]| match items.len() {
            0 => String::new(),
            1 => items[0].clone(),
            n => format!(
                "{} and {}",
                items[..n - 1]
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                items[n - 1]
            ),
        };
        let with = if parts.is_empty() {
            String::new()
        } else {
            format!(" with {}", list(&parts))
        };
        let mut out = vec![
            format!("an aerial view of {ground}{with}"),
            format!("this image shows {ground}{with}"),
        ];
        out.push(match (&buildings, &water) {
            (Some(b), _) => format!("{b} stand in {ground}"),
            (None, Some(w)) => format!("{w} goes through {ground}"),
            (None, None) => format!("only {ground} can be seen here"),
        });
        out.push(match (&road, &water) {
            (Some(r), Some(w)) => format!("{r} near {w}"),
            (Some(r), None) => format!("{r} passes through {ground}"),
            (None, Some(w)) => format!("there is {w} and no road in {ground}"),
            (None, None) => format!("{ground} without water or roads"),
        });
        let mut rev = parts.clone();
        rev.reverse();
        out.push(if rev.is_empty() {
            format!("a plain view of {ground}")
        } else {
            format!("{} in {ground}", list(&rev))
        });
        out
    }
}

/// Sizes of a generated set.
#[derive(Debug, Clone, Copy)]
pub struct SynthSizes {
    pub train: usize,
    pub val: usize,
    pub test: usize,
    /// image side in pixels
    pub size: usize,
    /// image file extension, which picks the format: "png", "tif" (RSITMD's), "jpg" (RSICD's)
    pub ext: &'static str,
}

/// Write `dir/images/*.png` and `dir/{train,val,test}.json` (HarMA's formats).
pub fn write_dataset(dir: &Path, sizes: SynthSizes, seed: u64) -> Result<()> {
    let images = dir.join("images");
    let io = |p: &Path, e: std::io::Error| Error::Io {
        path: p.display().to_string(),
        source: e,
    };
    std::fs::create_dir_all(&images).map_err(|e| io(&images, e))?;
    let mut k = 0u64;
    for (split, n) in [
        ("train", sizes.train),
        ("val", sizes.val),
        ("test", sizes.test),
    ] {
        let mut entries = Vec::new();
        for i in 0..n {
            let mut rng = Rng::derive(seed, &[k]);
            k += 1;
            let scene = Scene::random(&mut rng);
            let img = scene.render(sizes.size, &mut rng);
            let caps = scene.captions(&mut rng);
            let name = format!("{split}_{i:05}.{}", sizes.ext);
            let path = images.join(&name);
            image::save_buffer(
                &path,
                &img.data,
                img.width as u32,
                img.height as u32,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| Error::Image {
                path: path.display().to_string(),
                msg: e.to_string(),
            })?;
            if split == "train" {
                for c in caps {
                    entries.push(serde_json::json!({"caption": c, "image": name, "image_id": i}));
                }
            } else {
                entries.push(serde_json::json!({"image": name, "caption": caps}));
            }
        }
        let path = dir.join(format!("{split}.json"));
        let text = serde_json::to_string_pretty(&entries).expect("JSON of strings");
        std::fs::write(&path, text).map_err(|e| io(&path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_follow_the_content() {
        let scene = Scene {
            ground: Ground::Desert,
            water: Water::Lake(Place::Top),
            road: Road::None,
            buildings: 2,
            colour: 0,
        };
        let caps = scene.captions(&mut Rng::new(1));
        assert_eq!(caps.len(), 5);
        for c in &caps {
            assert!(c.contains("desert") || c.contains("sandy"), "{c}");
        }
        assert!(caps.iter().any(|c| c.contains("a lake at the top")));
        assert!(caps.iter().any(|c| c.contains("two red buildings")));
        assert!(caps.iter().all(|c| !c.contains("road passes")));
        // drawn: the lake's colour at the top centre, none at the bottom
        let img = scene.render(64, &mut Rng::new(2));
        let blue = |y: usize| {
            (0..64)
                .filter(|&x| img.data[(y * 64 + x) * 3..][..3] == [40, 80, 170])
                .count()
        };
        assert!(blue(14) > 10 && blue(60) == 0);
    }
}
