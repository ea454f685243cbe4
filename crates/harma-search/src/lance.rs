//! The scale-out tier (cargo feature `lance`): an index's live tiles written as a Lance table
//! through LanceDB, on local disk or object storage (`s3://`, `gs://`, `az://`), which LanceDB
//! itself, Ray and Spark read, index and serve. One row per tile: `id`, `file`, `x`, `y`, `w`,
//! `h`, `edge`, `epsg`, `min_x`, `min_y`, `max_x`, `max_y`, and `vector` (FixedSizeList of
//! f32, the unit embedding); the index's settings are in the schema's metadata under
//! `harma.settings`. Building it needs `protoc` (docs/SEARCH.md).

use std::collections::HashMap;
use std::sync::Arc;

use lancedb::arrow::arrow_array::{
    ArrayRef, FixedSizeListArray, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch,
    StringArray, UInt8Array,
};
use lancedb::arrow::arrow_schema::{DataType, Field, Schema};
use lancedb::database::CreateTableMode;

use crate::store::Index;
use crate::{Error, Result};

/// Rows per Arrow batch written.
const BATCH_ROWS: usize = 65536;

fn lance_err(e: impl std::fmt::Display) -> Error {
    Error::Other(format!("LanceDB: {e}"))
}

/// The Arrow schema of the table for embeddings of `dim` values.
pub fn schema(dim: usize, settings_json: String) -> Schema {
    let f = |name: &str, t: DataType, nullable: bool| Field::new(name, t, nullable);
    Schema::new(vec![
        f("id", DataType::Int64, false),
        f("file", DataType::Utf8, false),
        f("x", DataType::Int32, false),
        f("y", DataType::Int32, false),
        f("w", DataType::Int32, false),
        f("h", DataType::Int32, false),
        f("edge", DataType::UInt8, false),
        f("epsg", DataType::Int32, true),
        f("min_x", DataType::Float64, true),
        f("min_y", DataType::Float64, true),
        f("max_x", DataType::Float64, true),
        f("max_y", DataType::Float64, true),
        f(
            "vector",
            DataType::FixedSizeList(
                Arc::new(Field::new("item", DataType::Float32, true)),
                dim as i32,
            ),
            false,
        ),
    ])
    .with_metadata(HashMap::from([(
        "harma.settings".to_string(),
        settings_json,
    )]))
}

/// Write the live tiles of `index` as table `table` of the LanceDB database at `uri`
/// (replacing a table of that name), with `storage_options` for object storage (for S3:
/// `endpoint`, `region`, `allow_http`, `aws_access_key_id`, ...). Returns the rows written.
pub fn export(
    index: &mut Index,
    uri: &str,
    table: &str,
    storage_options: &[(String, String)],
) -> Result<usize> {
    let (vectors, tiles) = index.read(|view| {
        let vectors = view.vectors()?;
        let tiles = view.tiles(&vectors.ids)?;
        Ok((vectors, tiles))
    })?;
    let dim = vectors.dim;
    let settings = serde_json::to_string(&index.settings).expect("settings serialise");
    let schema = Arc::new(schema(dim, settings));
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let mut batches = Vec::new();
    for (c, chunk) in tiles.chunks(BATCH_ROWS).enumerate() {
        let start = c * BATCH_ROWS;
        let ints = |g: &dyn Fn(&crate::store::TileInfo) -> usize| -> ArrayRef {
            Arc::new(Int32Array::from_iter_values(
                chunk.iter().map(|t| g(t) as i32),
            ))
        };
        let bbox = |k: usize| -> ArrayRef {
            Arc::new(Float64Array::from_iter(
                chunk.iter().map(|t| t.bbox.map(|b| b[k])),
            ))
        };
        let values = Float32Array::from_iter_values(
            vectors.data[start * dim..(start + chunk.len()) * dim]
                .iter()
                .copied(),
        );
        let vector = FixedSizeListArray::try_new(item.clone(), dim as i32, Arc::new(values), None)
            .map_err(lance_err)?;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(chunk.iter().map(|t| t.id))),
            Arc::new(StringArray::from_iter_values(
                chunk.iter().map(|t| t.file.as_str()),
            )),
            ints(&|t| t.tile.x),
            ints(&|t| t.tile.y),
            ints(&|t| t.tile.w),
            ints(&|t| t.tile.h),
            Arc::new(UInt8Array::from_iter_values(
                chunk.iter().map(|t| t.tile.edge),
            )),
            Arc::new(Int32Array::from_iter(
                chunk.iter().map(|t| t.epsg.map(|e| e as i32)),
            )),
            bbox(0),
            bbox(1),
            bbox(2),
            bbox(3),
            Arc::new(vector),
        ];
        batches.push(RecordBatch::try_new(schema.clone(), columns).map_err(lance_err)?);
    }
    if batches.is_empty() {
        batches.push(RecordBatch::new_empty(schema.clone()));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Other(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async {
        let mut connect = lancedb::connect(uri);
        for (k, v) in storage_options {
            connect = connect.storage_option(k.clone(), v.clone());
        }
        let db = connect.execute().await.map_err(lance_err)?;
        db.create_table(table, batches)
            .mode(CreateTableMode::Overwrite)
            .execute()
            .await
            .map_err(lance_err)?;
        Ok::<(), Error>(())
    })?;
    Ok(tiles.len())
}
