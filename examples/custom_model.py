"""A VAE written as two plain Pyro programs, trained and evaluated by pyrovae.

    python examples/custom_model.py [--epochs 5]
"""

import argparse

import pyro
import pyro.distributions as dist
from torch import nn

from pyrovae import evaluate, fit, load_dataset


class TinyVAE(nn.Module):
    def __init__(self, z_dim=10):
        super().__init__()
        self.z_dim = z_dim
        self.decoder = nn.Sequential(nn.Linear(z_dim, 256), nn.Softplus(), nn.Linear(256, 784))
        self.encoder = nn.Sequential(nn.Linear(784, 256), nn.Softplus(), nn.Linear(256, 2 * z_dim))

    def model(self, x):  # p(z) p(x | z)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):  # q(z | x)
        loc, log_scale = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=None)
    args = parser.parse_args()
    train = load_dataset("mnist", "train", binarize="dynamic")
    test = load_dataset("mnist", "test", binarize="dynamic")
    if args.train_size:
        train, test = train.subset(args.train_size), test.subset(args.train_size // 5)
    result = fit(TinyVAE(), train, test, elbo="TraceMeanField_ELBO", epochs=args.epochs)
    print(result.history.to_string(index=False))
    print(evaluate(result.model, test, num_samples=100).to_frame().T.to_string(header=False))
