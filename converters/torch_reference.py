"""PyTorch reference definitions of the networks rsjax converts (for tests and benchmarks).

- :class:`CifarResNet` / :func:`cifar_resnet`: Cohen's ``archs/cifar_resnet.py`` (from
  bearpaw/pytorch-classification), BasicBlock, depth 6n+2. MACER's ``ResNet_Cifar`` has the
  same topology and attribute names.
- :class:`ResNet` / :func:`resnet50`: torchvision's ResNet-50 v1.5 with torchvision's exact
  attribute names (``conv1``, ``bn1``, ``layer{1..4}.{i}.conv{1,2,3}``/``bn{1,2,3}``,
  ``downsample.0/.1``, ``fc``), since torchvision itself is not a dependency.
- :class:`LeNet`: the MNIST LeNet of ``../shared/data/models/mnist_lenet_noise0.25``.
- :class:`NormalizeLayer` (Cohen; ``(x - mean) / std``) and :class:`InputCenterLayer`
  (Salman et al.; ``x - mean``). Like the originals, they keep mean/std as plain attributes,
  not buffers, so they contribute no keys to a state dict.
- :func:`cohen_model`: ``Sequential(NormalizeLayer, net)`` as in Cohen's ``architectures.py``
  (optionally with ``DataParallel``-style ``module.`` wrapping via :class:`ModuleWrapper`).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NormalizeLayer(nn.Module):
    """Cohen et al.: ``(x - mean) / std`` per channel on NCHW input in [0, 1]; no saved state
    (non-persistent buffers: they follow ``.to(device)`` - Cohen's code calls ``.cuda()`` on them -
    and stay out of the state dict, as in Cohen's files)."""

    def __init__(self, means, sds):
        super().__init__()
        self.register_buffer("means", torch.tensor(means, dtype=torch.float32), persistent=False)
        self.register_buffer("sds", torch.tensor(sds, dtype=torch.float32), persistent=False)

    def forward(self, x):
        return (x - self.means.view(1, -1, 1, 1)) / self.sds.view(1, -1, 1, 1)


class InputCenterLayer(nn.Module):
    """Salman et al. (SmoothAdv): ``x - mean`` per channel; no saved state (a non-persistent buffer)."""

    def __init__(self, means):
        super().__init__()
        self.register_buffer("means", torch.tensor(means, dtype=torch.float32), persistent=False)

    def forward(self, x):
        return x - self.means.view(1, -1, 1, 1)


class ModuleWrapper(nn.Module):
    """Holds the net as ``.module`` so that state-dict keys get the ``module.`` prefix, like
    ``torch.nn.DataParallel`` does (without needing a GPU)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


# ---------------------------------------------------------------- Cohen / bearpaw CIFAR ResNet

def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(out + residual)


class CifarResNet(nn.Module):
    """bearpaw/Cohen ``ResNet(depth, num_classes)`` with BasicBlocks (depth = 6n+2)."""

    def __init__(self, depth, num_classes=10):
        super().__init__()
        assert (depth - 2) % 6 == 0, "depth should be 6n+2"
        n = (depth - 2) // 6
        block = BasicBlock
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 16, n)
        self.layer2 = self._make_layer(block, 32, n, stride=2)
        self.layer3 = self._make_layer(block, 64, n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / k))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        return self.fc(x.view(x.size(0), -1))


def cifar_resnet(depth, num_classes=10):
    return CifarResNet(depth, num_classes)


# ---------------------------------------------------------------- torchvision ResNet-50 (v1.5)

class Bottleneck(nn.Module):
    """torchvision Bottleneck (v1.5: the stride is on the 3x3 conv2)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision ``ResNet(Bottleneck, layers, num_classes)`` (ImageNet stem)."""

    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet50(num_classes=1000):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


# ---------------------------------------------------------------- MNIST LeNet

class LeNet(nn.Module):
    """conv1 5x5 (1->20) - ReLU - pool 2 - conv2 5x5 (20->50) - ReLU - pool 2 - fc1 800->500 - ReLU - fc2."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


# ---------------------------------------------------------------- assembly

def build_net(arch, num_classes):
    """The bare PyTorch network for an rsjax architecture name."""
    if arch.startswith("cifar_resnet"):
        return cifar_resnet(int(arch[len("cifar_resnet"):]), num_classes)
    if arch == "resnet50":
        return resnet50(num_classes)
    if arch == "lenet":
        return LeNet(num_classes)
    raise ValueError(f"no PyTorch reference for {arch!r}")


def cohen_model(net, normalizer, data_parallel=False):
    """``Sequential(normalizer, net)`` (state-dict prefix ``1.``), or ``Sequential(normalizer,
    DataParallel(net))`` (prefix ``1.module.``) when ``data_parallel``; ``normalizer`` may be
    ``None`` for an identity layer."""
    body = ModuleWrapper(net) if data_parallel else net
    return nn.Sequential(normalizer if normalizer is not None else nn.Identity(), body)


def randomize_batchnorm_(model, generator=None, calibrate=None):
    """Give every BatchNorm random affine parameters and random running statistics, in place,
    so that a conversion that mixes up scale/bias/mean/var cannot pass a parity test.

    With ``calibrate`` (an NCHW batch for ``model``), the running statistics are first set to
    the batch statistics of that batch (so that deep random nets keep sane activations) and
    then perturbed randomly; without it they are drawn from scratch.
    """
    g = generator
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            c = m.num_features
            m.weight.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.copy_(0.2 * torch.randn(c, generator=g))
            m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
        if calibrate is not None:
            momenta = [m.momentum for m in bns]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average = the batch's statistics
            was_training = model.training
            model.train()
            model(calibrate)
            model.train(was_training)
            for m, mom in zip(bns, momenta):
                m.momentum = mom
        for m in bns:
            c = m.num_features
            m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn(c, generator=g))
            m.running_var.mul_(0.8 + 0.45 * torch.rand(c, generator=g))
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
    return model


# ---------------------------------------------------------------- MACER's loss (for benchmarks and reference runs)

def macer_loss(net, inputs, targets, noise, *, sigma, lbd=12.0, beta=16.0, gamma=8.0):
    """MACER's objective as RuntianZ/macer ``macer.py`` computes it (spec 3.1), on NCHW ``inputs``
    (B images) and ``noise`` (B*k standard normal copies, an image's copies adjacent):
    ``(L_C + lbd * L_R) / B`` with ``L_C = sum_i -log(mean_j softmax(z_ij)[y_i] + 1e-10)`` and
    ``L_R = sigma/2 sum_kept (gamma - (Phi^-1(a_i) - Phi^-1(b_i)))`` over top-2 ``a_i >= b_i`` of
    ``mean_j softmax(beta z_ij)``, kept when the argmax is ``y_i`` and the gap is finite and <= gamma
    (``torch.distributions.Normal.icdf``, as the reference). Returns (loss, L_C, L_R, correct)."""
    from torch.distributions.normal import Normal

    b, k = len(inputs), noise.shape[0] // len(inputs)
    if noise.shape[0] != b * k or noise.shape[1:] != inputs.shape[1:]:
        raise ValueError(f"noise {tuple(noise.shape)} is not k copies of inputs {tuple(inputs.shape)}")
    m = Normal(torch.tensor([0.0], device=inputs.device), torch.tensor([1.0], device=inputs.device))
    noisy = inputs.repeat((1, k, 1, 1)).view([b * k] + list(inputs.shape[1:])) + noise * sigma
    outputs = net(noisy).reshape((b, k, -1))
    softmax = F.softmax(outputs, dim=2).mean(1)
    classification_loss = F.nll_loss(torch.log(softmax + 1e-10), targets, reduction="sum")
    top2_score, top2_idx = torch.topk(F.softmax(outputs * beta, dim=2).mean(1), 2)
    correct = top2_idx[:, 0] == targets
    out0, out1 = top2_score[correct, 0], top2_score[correct, 1]
    gap = m.icdf(out1) - m.icdf(out0)
    keep = ~torch.isnan(gap) & ~torch.isinf(gap) & (torch.abs(gap) <= gamma)
    out0, out1 = out0[keep], out1[keep]
    robustness_loss = (m.icdf(out1) - m.icdf(out0) + gamma).sum() * sigma / 2
    loss = (classification_loss + lbd * robustness_loss) / b
    return loss, classification_loss, robustness_loss, softmax.argmax(1) == targets
