#ifndef FLOWFORCE_COMPILED_POTENTIAL_FORCE_H_
#define FLOWFORCE_COMPILED_POTENTIAL_FORCE_H_

// An OpenMM Force whose energy and forces come from an AOTInductor package (.pt2) that
// openmm-flowforce compiled from a learned potential (a flow potential U = -kT log q, or a
// coarse-grained energy network).
//
// The package is referenced by path and by the SHA-256 of its bytes: a System that holds this
// force serialises to XML without embedding any code, and a Context refuses to run a package
// whose bytes no longer match the recorded hash.
//
// Program contract (written by openmm_flowforce.export.compiled): one input, the positions of
// the model's particles, shape (n, 3), in nm, of the package's dtype on the package's device;
// outputs (energy, forces): energy of shape () or (1,) in kJ/mol and forces (n, 3) in kJ/mol/nm.

#include "openmm/Force.h"
#include <string>
#include <vector>

#if defined(_WIN32)
#define FLOWFORCE_EXPORT __declspec(dllexport)
#else
#define FLOWFORCE_EXPORT __attribute__((visibility("default")))
#endif

namespace FlowForcePlugin {

class FLOWFORCE_EXPORT CompiledPotentialForce : public OpenMM::Force {
public:
    /**
     * @param packagePath  path of the .pt2 file (stored as given: pass an absolute path)
     * @param sha256       lower-case hex SHA-256 of the file's bytes; empty: computed now
     * @param numModelParticles  particles the model was compiled for (n)
     * @param dtype        "float32" or "float64": the dtype the program takes
     * @param device       "cpu" or "cuda"
     */
    CompiledPotentialForce(const std::string& packagePath, const std::string& sha256, int numModelParticles,
                           const std::string& dtype = "float32", const std::string& device = "cpu");
    const std::string& getPackagePath() const { return packagePath; }
    const std::string& getPackageSha256() const { return sha256; }
    int getNumModelParticles() const { return numModelParticles; }
    const std::string& getDtype() const { return dtype; }
    const std::string& getDevice() const { return device; }
    /**
     * The System particles the model acts on, in the model's order. Empty (the default) means
     * particles 0 .. n-1.
     */
    const std::vector<int>& getParticles() const { return particles; }
    void setParticles(const std::vector<int>& particles);
    bool usesPeriodicBoundaryConditions() const override { return false; }

protected:
    OpenMM::ForceImpl* createImpl() const override;

private:
    std::string packagePath, sha256, dtype, device;
    int numModelParticles;
    std::vector<int> particles;
};

/** SHA-256 of a file's bytes as lower-case hex; throws OpenMMException if it cannot be read. */
FLOWFORCE_EXPORT std::string sha256OfFile(const std::string& path);

} // namespace FlowForcePlugin

#endif
