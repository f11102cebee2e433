//! sentence-transformers' `Dense` module: `activation(W·x + b)` on the sentence vector, with
//! its optional residual connection. Several chain in the order `modules.json` lists them.

use super::linear::Linear;

/// The activations a Dense module can name (`activation_function`), by their torch class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Tanh,
    Relu,
    Sigmoid,
    /// torch.nn.GELU's default, the exact (erf) form.
    Gelu,
    /// SiLU, x·sigmoid(x).
    Silu,
}

impl Activation {
    /// From the torch class path sentence-transformers stores, e.g.
    /// `torch.nn.modules.activation.Tanh`. None for a torch class we do not implement.
    pub fn from_torch_class(path: &str) -> Option<Activation> {
        Some(match path.rsplit('.').next()? {
            "Identity" => Activation::Identity,
            "Tanh" => Activation::Tanh,
            "ReLU" => Activation::Relu,
            "Sigmoid" => Activation::Sigmoid,
            "GELU" => Activation::Gelu,
            "SiLU" => Activation::Silu,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Activation::Identity => "identity",
            Activation::Tanh => "tanh",
            Activation::Relu => "relu",
            Activation::Sigmoid => "sigmoid",
            Activation::Gelu => "gelu",
            Activation::Silu => "silu",
        }
    }

    fn apply(self, v: &mut [f32]) {
        match self {
            Activation::Identity => {}
            Activation::Tanh => v.iter_mut().for_each(|x| *x = x.tanh()),
            Activation::Relu => v.iter_mut().for_each(|x| *x = x.max(0.0)),
            Activation::Sigmoid => v.iter_mut().for_each(|x| *x = 1.0 / (1.0 + (-*x).exp())),
            Activation::Gelu => super::kernels::gelu_erf(v),
            Activation::Silu => v.iter_mut().for_each(|x| *x /= 1.0 + (-*x).exp()),
        }
    }
}

/// One Dense module with its weights, ready to run.
pub struct Dense {
    pub linear: Linear,
    pub activation: Activation,
    /// `use_residual`: the input is added to the output, through its own bias-free projection
    /// when the sizes differ.
    pub residual: Option<Option<Linear>>,
}

impl Dense {
    pub fn inputs(&self) -> usize {
        self.linear.inputs
    }

    pub fn outputs(&self) -> usize {
        self.linear.outputs
    }

    /// Apply to every vector of `batch` (all `inputs()` long).
    pub fn forward(&self, batch: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let (rows, inputs, outputs) = (batch.len(), self.inputs(), self.outputs());
        let x: Vec<f32> = batch.iter().flatten().copied().collect();
        let mut y = vec![0f32; rows * outputs];
        self.linear.forward(&x, rows, &mut y, 1);
        self.activation.apply(&mut y);
        match &self.residual {
            None => {}
            Some(None) => y.iter_mut().zip(&x).for_each(|(o, i)| *o += i),
            Some(Some(projection)) => {
                let mut r = vec![0f32; rows * outputs];
                projection.forward(&x, rows, &mut r, 1);
                y.iter_mut().zip(&r).for_each(|(o, i)| *o += i);
            }
        }
        debug_assert_eq!(x.len(), rows * inputs);
        y.chunks_exact(outputs).map(<[f32]>::to_vec).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_by_torch_class() {
        assert_eq!(
            Activation::from_torch_class("torch.nn.modules.activation.Tanh"),
            Some(Activation::Tanh)
        );
        assert_eq!(
            Activation::from_torch_class("torch.nn.modules.linear.Identity"),
            Some(Activation::Identity)
        );
        assert_eq!(
            Activation::from_torch_class("torch.nn.modules.activation.Softmax"),
            None
        );
    }

    #[test]
    fn linear_then_activation_then_residual() {
        // W = [[1, 0], [0, 2]] (torch [out, in]), b = [0, -1].
        let linear = || Linear::from_torch(&[1.0, 0.0, 0.0, 2.0], vec![0.0, -1.0], 2, 2);
        let dense = Dense {
            linear: linear(),
            activation: Activation::Relu,
            residual: None,
        };
        assert_eq!(dense.forward(&[vec![1.0, 0.25]]), [[1.0, 0.0]]);
        let residual = Dense {
            linear: linear(),
            activation: Activation::Identity,
            residual: Some(None),
        };
        assert_eq!(residual.forward(&[vec![1.0, 1.0]]), [[2.0, 2.0]]);
        let tanh = Dense {
            linear: linear(),
            activation: Activation::Tanh,
            residual: None,
        };
        let y = tanh.forward(&[vec![0.5, 1.0]]);
        assert!((y[0][0] - 0.5f32.tanh()).abs() < 1e-7 && (y[0][1] - 1f32.tanh()).abs() < 1e-7);
    }
}
