//! Overlapping input preparation with compute: a producer thread prepares items (decoding and
//! transforming images, in parallel with rayon) at most `depth` ahead of the consumer, so
//! memory stays bounded and the model never waits for a whole batch to decode.

use std::ops::Range;

use anyhow::Result;

/// Run `produce(i)` for each `i` of `range` on a background thread, at most `depth` results
/// ahead, and hand them to `consume` in order. Stops at the first error of either side (and
/// returns it) or when `consume` returns `Ok(false)`.
pub fn prefetch<T: Send>(
    range: Range<usize>,
    depth: usize,
    produce: impl Fn(usize) -> Result<T> + Send + Sync,
    mut consume: impl FnMut(usize, T) -> Result<bool>,
) -> Result<()> {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Result<T>)>(depth);
        let produce = &produce;
        let items = range.clone();
        s.spawn(move || {
            for i in items {
                let item = produce(i);
                let failed = item.is_err();
                // a closed channel means the consumer stopped
                if tx.send((i, item)).is_err() || failed {
                    break;
                }
            }
        });
        for (i, item) in rx {
            if !consume(i, item?)? {
                break;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_arrive_in_order_and_errors_stop_both_sides() {
        let mut seen = Vec::new();
        prefetch(
            3..9,
            2,
            |i| Ok(i * 10),
            |i, v| {
                seen.push((i, v));
                Ok(true)
            },
        )
        .unwrap();
        assert_eq!(seen, (3..9).map(|i| (i, i * 10)).collect::<Vec<_>>());

        let mut n = 0;
        let err = prefetch(
            0..100,
            1,
            |i| {
                if i == 4 {
                    anyhow::bail!("bad item {i}")
                } else {
                    Ok(i)
                }
            },
            |_, _| {
                n += 1;
                Ok(true)
            },
        )
        .unwrap_err();
        assert_eq!((err.to_string().as_str(), n), ("bad item 4", 4));

        let mut last = 0;
        prefetch(0..100, 1, Ok, |i, _| {
            last = i;
            Ok(i < 5)
        })
        .unwrap();
        assert_eq!(last, 5);
    }
}
