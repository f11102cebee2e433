//! Reading safetensors weights through a memory map into plain f32 vectors, which both forward
//! passes and the Dense modules build on.
//!
//! Where the weights live, once and for all: the safetensors file is mapped only while the
//! master loads; the model keeps its weights in f32 vectors of the master's (packed for the
//! forward pass, `linear::Linear`), each of them 128 KiB or more and so, with the malloc
//! threshold `main.rs` sets before anything else, its own anonymous mapping rather than heap.
//! Every worker shares those pages copy-on-write and never writes them.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use memmap2::Mmap;
use safetensors::SafeTensors;

use super::files::LoadError;

/// Weights by name: shape and f32 values.
pub struct RawWeights {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

/// The safetensors file(s) of a module directory: `model.safetensors`, or the shards a
/// `model.safetensors.index.json` lists. Weights only in PyTorch's pickle format are refused:
/// reading them means unpickling, which runs code.
pub fn files_in(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let parsed: serde_json::Value = super::files::read_json(&index)?;
        let Some(map) = parsed.get("weight_map").and_then(|m| m.as_object()) else {
            return Err(LoadError::invalid(&index, "no \"weight_map\" object"));
        };
        let mut shards: Vec<PathBuf> = Vec::new();
        for file in map.values() {
            let Some(name) = file
                .as_str()
                .filter(|n| !n.contains('/') && !n.contains(".."))
            else {
                return Err(LoadError::invalid(
                    &index,
                    format!("weight_map: {file} is not a file name in this directory"),
                ));
            };
            let path = dir.join(name);
            if !shards.contains(&path) {
                shards.push(path);
            }
        }
        return Ok(shards);
    }
    for pickle in ["pytorch_model.bin", "model.bin"] {
        if dir.join(pickle).is_file() {
            return Err(LoadError::unsupported(
                dir.join(pickle),
                "weights",
                pickle,
                "only safetensors weights are read (a pickle runs code when loaded); convert it \
                 once with `safetensors.torch.save_file(torch.load(...), \"model.safetensors\")`",
            ));
        }
    }
    Err(LoadError::Missing { path: single })
}

/// Map each file, copy every floating-point tensor out as f32 (f16/bf16 are widened:
/// half-precision BERT gave NaN in candle here), and unmap. Integer buffers such as
/// `position_ids` are not weights and are skipped.
///
/// The copies are large allocations, which glibc serves from their own anonymous mappings
/// (the master fixes the mmap threshold at 128 KiB in `main.rs`). The master does this before
/// fork and no worker ever writes to them, so N workers share one copy through copy-on-write.
pub fn load(paths: &[PathBuf]) -> Result<RawWeights, LoadError> {
    let mut tensors = HashMap::new();
    for path in paths {
        read_into(path, &mut tensors)?;
    }
    Ok(RawWeights { tensors })
}

fn read_into(
    path: &Path,
    out: &mut HashMap<String, (Vec<usize>, Vec<f32>)>,
) -> Result<(), LoadError> {
    let invalid = |reason: String| LoadError::invalid(path, reason);
    let file = File::open(path).map_err(|e| invalid(e.to_string()))?;
    // SAFETY: the mapping is read-only and lives only inside this function; the tensors are
    // copied out before it is dropped. A concurrent truncation of the file by another process
    // would fault (SIGBUS) while we copy; nothing in forkserve writes model files, and a model
    // being replaced is expected to be swapped in with a rename (which keeps this inode intact).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| invalid(e.to_string()))?;
    let tensors = SafeTensors::deserialize(&map).map_err(|e| invalid(e.to_string()))?;
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
        // An interrupted copy into a preallocated file leaves zeros (caught by the probe) or
        // 0xFF bytes, which are NaN: weights must be finite.
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(invalid(format!(
                "tensor {name}: value {i} is {v}: the weights must be finite (a corrupt or \
                 truncated file?)"
            )));
        }
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(())
}

impl RawWeights {
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Remove and return tensor `name`, checking its shape. Checkpoints converted from
    /// TensorFlow call a layer norm's weight and bias `gamma` and `beta`; both are accepted, as
    /// transformers accepts them.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
        let legacy = name
            .strip_suffix(".LayerNorm.weight")
            .map(|p| format!("{p}.LayerNorm.gamma"))
            .or_else(|| {
                name.strip_suffix(".LayerNorm.bias")
                    .map(|p| format!("{p}.LayerNorm.beta"))
            });
        let (got, values) = self
            .tensors
            .remove(name)
            .or_else(|| legacy.and_then(|l| self.tensors.remove(&l)))
            .ok_or_else(|| format!("tensor {name} missing"))?;
        if got != shape {
            return Err(format!("tensor {name}: shape {got:?}, expected {shape:?}"));
        }
        Ok(values)
    }

    /// The weights as candle-transformers' models load them (the vectors are moved, not
    /// copied).
    pub fn into_var_builder(self) -> candle_core::Result<VarBuilder<'static>> {
        let mut tensors = HashMap::with_capacity(self.tensors.len());
        for (name, (shape, values)) in self.tensors {
            tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
        }
        Ok(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
    }
}
