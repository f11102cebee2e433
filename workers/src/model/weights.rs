//! Reading `model.safetensors` through a memory map into candle tensors.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use memmap2::Mmap;
use safetensors::SafeTensors;

use super::files::LoadError;

/// Map the weights file, copy every tensor into a candle tensor (floats widened to f32), and
/// unmap.
///
/// candle's CPU tensors own their storage, so the weights end up on the master's heap. That is
/// what makes them shared: the master does this before fork and no worker ever writes to those
/// pages, so N workers share one copy through copy-on-write (measured in the README).
pub fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>, LoadError> {
    let invalid = |reason: String| LoadError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let map = map_file(path)?;
    let tensors = SafeTensors::deserialize(&map).map_err(|e| invalid(e.to_string()))?;

    let mut out = HashMap::new();
    for (name, view) in tensors.tensors() {
        let dtype = candle_dtype(view.dtype()).ok_or_else(|| {
            invalid(format!(
                "tensor {name}: unsupported dtype {:?}",
                view.dtype()
            ))
        })?;
        let tensor = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
            .and_then(|t| match dtype.is_float() {
                // Half-precision weights are widened: f16/bf16 BERT gave NaN in candle here.
                true => t.to_dtype(DType::F32),
                // Integer buffers (e.g. `embeddings.position_ids`) keep their type.
                false => Ok(t),
            })
            .map_err(|e| invalid(format!("tensor {name}: {e}")))?;
        out.insert(name, tensor);
    }
    Ok(out)
}

/// Memory-map the weights file, read-only. Callers copy what they need out of the map and
/// drop it.
fn map_file(path: &Path) -> Result<Mmap, LoadError> {
    let invalid = |e: std::io::Error| LoadError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let file = File::open(path).map_err(invalid)?;
    // SAFETY: the mapping is read-only and each caller copies the tensors out before dropping
    // it. A concurrent truncation of the file by another process would fault (SIGBUS) while we
    // copy; nothing in forkserve writes model files, and a model being replaced is expected to
    // be swapped in with a rename (which keeps this inode intact).
    unsafe { Mmap::map(&file) }.map_err(invalid)
}

/// The tensors as candle-transformers' `BertModel` loads them.
pub fn var_builder(tensors: HashMap<String, Tensor>) -> VarBuilder<'static> {
    VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)
}

/// The floating-point tensors as plain f32 vectors, for the fast forward pass, read straight
/// from the map (one copy; f16/bf16 are widened through candle).
pub fn load_raw(path: &Path) -> Result<super::fast::RawWeights, LoadError> {
    let invalid = |reason: String| LoadError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let map = map_file(path)?;
    let tensors = SafeTensors::deserialize(&map).map_err(|e| invalid(e.to_string()))?;
    let mut out = HashMap::new();
    for (name, view) in tensors.tensors() {
        let values: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            safetensors::Dtype::F16 | safetensors::Dtype::BF16 => {
                let dtype = candle_dtype(view.dtype()).unwrap_or(DType::F32);
                Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| invalid(format!("tensor {name}: {e}")))?
            }
            // Integer buffers such as position_ids are not weights.
            _ => continue,
        };
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

fn candle_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    match dtype {
        S::F32 => Some(DType::F32),
        S::F16 => Some(DType::F16),
        S::BF16 => Some(DType::BF16),
        S::F64 => Some(DType::F64),
        S::I64 => Some(DType::I64),
        S::I32 => Some(DType::I32),
        S::U32 => Some(DType::U32),
        S::U8 => Some(DType::U8),
        _ => None,
    }
}
