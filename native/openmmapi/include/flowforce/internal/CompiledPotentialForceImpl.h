#ifndef FLOWFORCE_COMPILED_POTENTIAL_FORCE_IMPL_H_
#define FLOWFORCE_COMPILED_POTENTIAL_FORCE_IMPL_H_

#include "flowforce/CompiledPotentialForce.h"
#include "openmm/internal/CustomCPPForceImpl.h"
#include <ATen/Tensor.h>
#include <memory>
#include <vector>

namespace torch::inductor { class AOTIModelPackageLoader; }

namespace FlowForcePlugin {

/**
 * Runs the compiled program through OpenMM's CustomCPPForceImpl, which provides the kernel on
 * every platform: positions arrive on the host as Vec3 (double), the forces go back the same way.
 * One implementation for Reference, CPU, CUDA and OpenCL; on GPU platforms it costs one small
 * host round trip per step (see README, "Native plugin").
 */
class CompiledPotentialForceImpl : public OpenMM::CustomCPPForceImpl {
public:
    explicit CompiledPotentialForceImpl(const CompiledPotentialForce& owner);
    ~CompiledPotentialForceImpl() override;
    void initialize(OpenMM::ContextImpl& context) override;
    double computeForce(OpenMM::ContextImpl& context, const std::vector<OpenMM::Vec3>& positions,
                        std::vector<OpenMM::Vec3>& forces) override;
    const CompiledPotentialForce& getOwner() const { return owner; }

private:
    const CompiledPotentialForce& owner;
    std::shared_ptr<torch::inductor::AOTIModelPackageLoader> loader;
    std::vector<int> particles;
    at::Tensor hostPositions;  // (n, 3) float64 staging buffer, reused every step
    bool onCuda = false;
    at::ScalarType dtype;
};

} // namespace FlowForcePlugin

#endif
