//! Reading `model.safetensors` through a memory map into plain f32 vectors, which both forward
//! passes build on.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use memmap2::Mmap;
use safetensors::SafeTensors;

use super::files::LoadError;

/// Weights by name: shape and f32 values.
pub type RawWeights = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Map the weights file, copy every floating-point tensor out as f32 (f16/bf16 are widened:
/// half-precision BERT gave NaN in candle here), and unmap. Integer buffers such as
/// `position_ids` are not weights and are skipped.
///
/// The copies land on the master's heap. That is what makes them shared: the master does this
/// before fork and no worker ever writes to those pages, so N workers share one copy through
/// copy-on-write (measured in the README).
pub fn load(path: &Path) -> Result<RawWeights, LoadError> {
    let invalid = |reason: String| LoadError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| invalid(e.to_string()))?;
    // SAFETY: the mapping is read-only and lives only inside this function; the tensors are
    // copied out before it is dropped. A concurrent truncation of the file by another process
    // would fault (SIGBUS) while we copy; nothing in forkserve writes model files, and a model
    // being replaced is expected to be swapped in with a rename (which keeps this inode intact).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| invalid(e.to_string()))?;
    let tensors = SafeTensors::deserialize(&map).map_err(|e| invalid(e.to_string()))?;
    let mut out = HashMap::new();
    for (name, view) in tensors.tensors() {
        let half = match view.dtype() {
            safetensors::Dtype::F32 => None,
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            _ => continue,
        };
        let values: Vec<f32> = match half {
            None => view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Some(dtype) => Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| invalid(format!("tensor {name}: {e}")))?,
        };
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

/// The weights as candle-transformers' `BertModel` loads them (the vectors are moved, not
/// copied).
pub fn var_builder(weights: RawWeights) -> candle_core::Result<VarBuilder<'static>> {
    let mut tensors = HashMap::with_capacity(weights.len());
    for (name, (shape, values)) in weights {
        tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    Ok(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
}
