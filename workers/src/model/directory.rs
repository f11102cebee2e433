//! Reading a model directory the way sentence-transformers does: `modules.json`, then each
//! module's own configuration, then `config_sentence_transformers.json`. Only small JSON files
//! are read here; the weights and the tokenizer are loaded from what this returns.
//!
//! Whatever the directory asks for that forkserve does not implement is refused with the file,
//! the field and the value: serving something else than `SentenceTransformer.encode` would give
//! is worse than not starting.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};

use super::dense::Activation;
use super::files::{read_json, read_optional_json, LoadError};
use super::pooling::{Pooling, PoolingMode};

/// The files sentence-transformers reads a Transformer module's settings from, in its order.
const TRANSFORMER_CONFIGS: [&str; 7] = [
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
];

/// Everything the directory says about how to embed a sentence.
#[derive(Debug)]
pub struct ModelSpec {
    pub dir: PathBuf,
    pub transformer: TransformerSpec,
    pub pooling: Pooling,
    /// Dense and Normalize modules after the pooling, in order.
    pub after_pooling: Vec<Step>,
    pub prompts: BTreeMap<String, String>,
    pub default_prompt_name: Option<String>,
    /// `similarity_fn_name` (cosine when unset, as sentence-transformers defaults).
    pub similarity: String,
    /// A plain transformers directory (no `modules.json`), served with mean pooling.
    pub plain: bool,
}

/// The Transformer module: where its files are and the settings of its config file.
#[derive(Debug)]
pub struct TransformerSpec {
    pub dir: PathBuf,
    /// `max_seq_length` of `sentence_bert_config.json`.
    pub max_seq_length: Option<usize>,
    /// `model_max_length` in its processor (tokenizer) arguments, which wins over the rest.
    pub model_max_length: Option<usize>,
    pub do_lower_case: bool,
    /// The config file read (for messages), if any.
    pub config_file: Option<PathBuf>,
}

#[derive(Debug)]
pub enum Step {
    Dense(DenseSpec),
    Normalize,
}

#[derive(Debug)]
pub struct DenseSpec {
    pub dir: PathBuf,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
    pub activation: Activation,
    pub use_residual: bool,
}

/// The module classes forkserve implements, by the class name at the end of `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Transformer,
    Pooling,
    Dense,
    Normalize,
    /// Dropout does nothing at inference.
    Dropout,
}

impl ModelSpec {
    pub fn read(dir: &Path) -> Result<ModelSpec, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::Missing {
                path: dir.to_path_buf(),
            });
        }
        let modules_json = dir.join("modules.json");
        if !modules_json.is_file() {
            return ModelSpec::plain(dir);
        }
        let modules: Vec<Value> = read_json(&modules_json)?;
        let mut transformer = None;
        let mut pooling = None;
        let mut after_pooling = Vec::new();
        for (i, module) in modules.iter().enumerate() {
            let field = |name: &str| format!("[{i}].{name}");
            let type_path = module.get("type").and_then(Value::as_str).ok_or_else(|| {
                LoadError::invalid(&modules_json, format!("{}: missing", field("type")))
            })?;
            let path = module.get("path").and_then(Value::as_str).unwrap_or("");
            let module_dir = module_path(dir, path).ok_or_else(|| {
                LoadError::unsupported(
                    &modules_json,
                    field("path"),
                    quoted(path),
                    "a module path must stay inside the model directory",
                )
            })?;
            let kind = kind_of(type_path).ok_or_else(|| {
                LoadError::unsupported(
                    &modules_json,
                    field("type"),
                    quoted(type_path),
                    "forkserve implements sentence-transformers' Transformer, Pooling, Dense, \
                     Normalize and Dropout modules, and runs no custom module code",
                )
            })?;
            let misplaced = |why: &str| {
                LoadError::unsupported(&modules_json, field("type"), quoted(type_path), why)
            };
            match kind {
                Kind::Transformer if i == 0 => {
                    transformer = Some(read_transformer(&module_dir)?);
                }
                Kind::Transformer => {
                    return Err(misplaced(
                        "the Transformer must be the first module, and the only one",
                    ))
                }
                _ if transformer.is_none() => {
                    return Err(misplaced("the first module must be a Transformer"))
                }
                Kind::Pooling if pooling.is_none() => pooling = Some(read_pooling(&module_dir)?),
                Kind::Pooling => return Err(misplaced("a second Pooling module")),
                Kind::Dropout => {}
                Kind::Dense | Kind::Normalize if pooling.is_none() => {
                    return Err(misplaced(
                        "modules on token embeddings (before the Pooling) are not implemented",
                    ))
                }
                Kind::Dense => after_pooling.push(Step::Dense(read_dense(&module_dir)?)),
                Kind::Normalize => {
                    check_normalize(&module_dir)?;
                    after_pooling.push(Step::Normalize);
                }
            }
        }
        let Some(transformer) = transformer else {
            return Err(LoadError::unsupported(
                &modules_json,
                "[0].type",
                "(none)",
                "no Transformer module",
            ));
        };
        let Some(pooling) = pooling else {
            return Err(LoadError::unsupported(
                &modules_json,
                "type",
                "(no Pooling module)",
                "without a Pooling module sentence-transformers returns token embeddings, not \
                 sentence embeddings",
            ));
        };
        let (prompts, default_prompt_name, similarity) = read_st_config(dir)?;
        Ok(ModelSpec {
            dir: dir.to_path_buf(),
            transformer,
            pooling,
            after_pooling,
            prompts,
            default_prompt_name,
            similarity,
            plain: false,
        })
    }

    /// A directory without `modules.json`: sentence-transformers wraps the transformer with
    /// mean pooling and nothing else.
    fn plain(dir: &Path) -> Result<ModelSpec, LoadError> {
        Ok(ModelSpec {
            dir: dir.to_path_buf(),
            transformer: read_transformer(dir)?,
            pooling: Pooling::mean(),
            after_pooling: Vec::new(),
            prompts: default_prompts(),
            default_prompt_name: None,
            similarity: "cosine".into(),
            plain: true,
        })
    }
}

fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// `dir/path`, refusing absolute paths and `..` (sentence-transformers refuses them too).
fn module_path(dir: &Path, path: &str) -> Option<PathBuf> {
    let rel = Path::new(path);
    rel.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        .then(|| dir.join(rel))
}

/// The module kind of a `modules.json` type: sentence-transformers' classic paths
/// (`sentence_transformers.models.Pooling`) and its v6 ones
/// (`sentence_transformers.sentence_transformer.modules.pooling.Pooling`,
/// `sentence_transformers.base.modules.dense.Dense`).
fn kind_of(type_path: &str) -> Option<Kind> {
    let (package, class) = type_path.rsplit_once('.')?;
    let known_package = [
        "sentence_transformers.models",
        "sentence_transformers.base.modules",
        "sentence_transformers.sentence_transformer.modules",
    ]
    .iter()
    .any(|p| {
        package == *p
            || package
                .strip_prefix(p)
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|file| !file.contains('.'))
    });
    if !known_package {
        return None;
    }
    Some(match class {
        "Transformer" => Kind::Transformer,
        "Pooling" => Kind::Pooling,
        "Dense" => Kind::Dense,
        "Normalize" => Kind::Normalize,
        "Dropout" => Kind::Dropout,
        _ => return None,
    })
}

fn read_transformer(dir: &Path) -> Result<TransformerSpec, LoadError> {
    let mut spec = TransformerSpec {
        dir: dir.to_path_buf(),
        max_seq_length: None,
        model_max_length: None,
        do_lower_case: false,
        config_file: None,
    };
    let Some(path) = TRANSFORMER_CONFIGS
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
    else {
        return Ok(spec);
    };
    let config = read_optional_json(&path)?.unwrap_or_default();
    let obj = config.as_object().cloned().unwrap_or_default();
    spec.max_seq_length = optional_usize(&obj, &path, "max_seq_length")?;
    spec.do_lower_case = optional_bool(&obj, &path, "do_lower_case")?.unwrap_or(false);
    for key in ["tokenizer_args", "processor_kwargs"] {
        if let Some(args) = obj.get(key).and_then(Value::as_object) {
            if let Some(n) = optional_usize(args, &path, "model_max_length")? {
                spec.model_max_length = Some(n);
            }
        }
    }
    if let Some(task) = obj.get("transformer_task").filter(|v| !v.is_null()) {
        if task.as_str() != Some("feature-extraction") {
            return Err(LoadError::unsupported(
                &path,
                "transformer_task",
                task,
                "only \"feature-extraction\" (an encoder's last hidden states) is implemented",
            ));
        }
    }
    if let Some(output) = obj.get("module_output_name").filter(|v| !v.is_null()) {
        if output.as_str() != Some("token_embeddings") {
            return Err(LoadError::unsupported(
                &path,
                "module_output_name",
                output,
                "the Transformer must output token_embeddings",
            ));
        }
    }
    if let Some(text) = obj.get("modality_config").and_then(|m| m.get("text")) {
        for (key, want) in [
            ("method", "forward"),
            ("method_output_name", "last_hidden_state"),
        ] {
            if let Some(v) = text.get(key).filter(|v| !v.is_null()) {
                if v.as_str() != Some(want) {
                    return Err(LoadError::unsupported(
                        &path,
                        format!("modality_config.text.{key}"),
                        v,
                        format!("only {want:?} is implemented"),
                    ));
                }
            }
        }
    }
    spec.config_file = Some(path);
    Ok(spec)
}

fn read_pooling(dir: &Path) -> Result<Pooling, LoadError> {
    let path = dir.join("config.json");
    let config: Value = read_json(&path)?;
    let obj = config
        .as_object()
        .ok_or_else(|| LoadError::invalid(&path, "expected a JSON object"))?;
    let mut modes = Vec::new();
    match obj.get("pooling_mode").filter(|v| !v.is_null()) {
        // sentence-transformers 6: a name, or a list of names concatenated in that order.
        Some(value) => {
            let names: Vec<&Value> = match value {
                Value::Array(items) => items.iter().collect(),
                single => vec![single],
            };
            for name in names {
                let mode = name.as_str().and_then(PoolingMode::parse).ok_or_else(|| {
                    LoadError::unsupported(
                        &path,
                        "pooling_mode",
                        name,
                        "expected one of cls, max, mean, mean_sqrt_len_tokens, weightedmean, \
                         lasttoken",
                    )
                })?;
                modes.push(mode);
            }
        }
        // Earlier versions: one boolean per mode, concatenated in a fixed order.
        None => {
            for (key, mode) in PoolingMode::LEGACY_KEYS {
                if optional_bool(obj, &path, key)?.unwrap_or(false) {
                    modes.push(mode);
                }
            }
        }
    }
    if modes.is_empty() {
        // What sentence-transformers does when no flag is set.
        modes.push(PoolingMode::Mean);
    }
    let include_prompt = optional_bool(obj, &path, "include_prompt")?.unwrap_or(true);
    Ok(Pooling {
        modes,
        include_prompt,
    })
}

fn read_dense(dir: &Path) -> Result<DenseSpec, LoadError> {
    let path = dir.join("config.json");
    let config: Value = read_json(&path)?;
    let obj = config
        .as_object()
        .ok_or_else(|| LoadError::invalid(&path, "expected a JSON object"))?;
    let required = |key: &str| -> Result<usize, LoadError> {
        optional_usize(obj, &path, key)?
            .ok_or_else(|| LoadError::invalid(&path, format!("{key}: missing")))
    };
    let activation = match obj.get("activation_function").filter(|v| !v.is_null()) {
        // The constructor's default.
        None => Activation::Tanh,
        Some(value) => {
            let name = value.as_str().unwrap_or("");
            if name.starts_with("torch.") {
                Activation::from_torch_class(name).ok_or_else(|| {
                    LoadError::unsupported(
                        &path,
                        "activation_function",
                        value,
                        "implemented: torch.nn Identity, Tanh, ReLU, Sigmoid, GELU, SiLU",
                    )
                })?
            } else {
                // sentence-transformers will not import a class from outside torch without
                // trust_remote_code: it warns and falls back to Tanh. So do we.
                tracing::warn!(
                    file = %path.display(),
                    activation_function = name,
                    "not a torch class: using Tanh, as sentence-transformers does without trust_remote_code"
                );
                Activation::Tanh
            }
        }
    };
    for key in ["module_input_name", "module_output_name"] {
        if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
            if v.as_str() != Some("sentence_embedding") {
                return Err(LoadError::unsupported(
                    &path,
                    key,
                    v,
                    "only Dense modules on the sentence embedding are implemented",
                ));
            }
        }
    }
    Ok(DenseSpec {
        dir: dir.to_path_buf(),
        in_features: required("in_features")?,
        out_features: required("out_features")?,
        bias: optional_bool(obj, &path, "bias")?.unwrap_or(true),
        activation,
        use_residual: optional_bool(obj, &path, "use_residual")?.unwrap_or(false),
    })
}

fn check_normalize(dir: &Path) -> Result<(), LoadError> {
    let path = dir.join("config.json");
    let Some(config) = read_optional_json(&path)? else {
        return Ok(());
    };
    for key in ["module_input_name", "module_output_name"] {
        if let Some(v) = config.get(key).filter(|v| !v.is_null()) {
            if v.as_str() != Some("sentence_embedding") {
                return Err(LoadError::unsupported(
                    &path,
                    key,
                    v,
                    "only normalising the sentence embedding is implemented",
                ));
            }
        }
    }
    Ok(())
}

type StConfig = (BTreeMap<String, String>, Option<String>, String);

/// sentence-transformers 6 gives every model a "query" and a "document" prompt, empty unless
/// the model sets them (so that `encode_query` never falls back to the default prompt).
fn default_prompts() -> BTreeMap<String, String> {
    ["query", "document"]
        .into_iter()
        .map(|name| (name.to_string(), String::new()))
        .collect()
}

/// `config_sentence_transformers.json`: prompts, the default prompt, the similarity function.
fn read_st_config(dir: &Path) -> Result<StConfig, LoadError> {
    let path = dir.join("config_sentence_transformers.json");
    let mut prompts = default_prompts();
    let Some(config) = read_optional_json(&path)? else {
        return Ok((prompts, None, "cosine".into()));
    };
    if let Some(kind) = config.get("model_type").filter(|v| !v.is_null()) {
        if kind.as_str() != Some("SentenceTransformer") {
            return Err(LoadError::unsupported(
                &path,
                "model_type",
                kind,
                "forkserve serves SentenceTransformer (bi-encoder) models",
            ));
        }
    }
    match config.get("prompts") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, text) in map {
                // sentence-transformers reads a null prompt as "".
                let text = match text {
                    Value::String(t) => t.clone(),
                    Value::Null => String::new(),
                    _ => {
                        return Err(LoadError::invalid(
                            &path,
                            format!("prompts.{name}: expected a string"),
                        ))
                    }
                };
                prompts.insert(name.clone(), text);
            }
        }
        Some(_) => return Err(LoadError::invalid(&path, "prompts: expected an object")),
    }
    let default_prompt_name = match config.get("default_prompt_name") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) if prompts.contains_key(name) => Some(name.clone()),
        Some(other) => {
            return Err(LoadError::unsupported(
                &path,
                "default_prompt_name",
                other,
                format!(
                    "not one of the prompts ({})",
                    prompts.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ))
        }
    };
    let similarity = match config.get("similarity_fn_name") {
        None | Some(Value::Null) => "cosine".to_string(),
        Some(Value::String(s))
            if ["cosine", "dot", "euclidean", "manhattan"].contains(&s.as_str()) =>
        {
            s.clone()
        }
        Some(other) => {
            return Err(LoadError::unsupported(
                &path,
                "similarity_fn_name",
                other,
                "expected cosine, dot, euclidean or manhattan",
            ))
        }
    };
    Ok((prompts, default_prompt_name, similarity))
}

fn optional_usize(
    obj: &Map<String, Value>,
    path: &Path,
    key: &str,
) -> Result<Option<usize>, LoadError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) if n >= 1 => Ok(Some(n)),
            _ => Err(LoadError::invalid(
                path,
                format!("{key}: expected a positive integer, got {v}"),
            )),
        },
    }
}

fn optional_bool(
    obj: &Map<String, Value>,
    path: &Path,
    key: &str,
) -> Result<Option<bool>, LoadError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(LoadError::invalid(
            path,
            format!("{key}: expected true or false, got {v}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_types_classic_and_v6() {
        assert_eq!(
            kind_of("sentence_transformers.models.Pooling"),
            Some(Kind::Pooling)
        );
        assert_eq!(
            kind_of("sentence_transformers.sentence_transformer.modules.pooling.Pooling"),
            Some(Kind::Pooling)
        );
        assert_eq!(
            kind_of("sentence_transformers.base.modules.transformer.Transformer"),
            Some(Kind::Transformer)
        );
        assert_eq!(
            kind_of("sentence_transformers.base.modules.Dense"),
            Some(Kind::Dense)
        );
        assert_eq!(kind_of("sentence_transformers.models.LSTM"), None);
        assert_eq!(kind_of("my_package.Pooling"), None);
        assert_eq!(kind_of("sentence_transformers.models.a.b.Pooling"), None);
    }

    #[test]
    fn module_paths_stay_inside() {
        let dir = Path::new("/m");
        assert_eq!(module_path(dir, ""), Some(PathBuf::from("/m/")));
        assert_eq!(
            module_path(dir, "1_Pooling"),
            Some(PathBuf::from("/m/1_Pooling"))
        );
        assert_eq!(module_path(dir, "../x"), None);
        assert_eq!(module_path(dir, "/etc"), None);
    }
}
