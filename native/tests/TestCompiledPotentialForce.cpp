// C++ tests of the plugin. Without arguments: SHA-256 against the FIPS 180-4 test vectors and
// argument validation. With the path of the toy package that tests/test_native.py compiles
// (E = sum |r|^2 over the model's particles, F = -2r): energies and forces in a real Context on the
// Reference platform, a particle subset, the XML round trip and the refusal of a changed package.
#include "flowforce/CompiledPotentialForce.h"
#include "OpenMM.h"
#include "openmm/serialization/XmlSerializer.h"
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

using namespace OpenMM;
using namespace FlowForcePlugin;

static int failures = 0;
#define CHECK(cond, what)                                                    \
    do {                                                                     \
        if (!(cond)) {                                                       \
            std::cerr << "FAIL: " << what << " (" << #cond << ")\n";         \
            failures++;                                                      \
        }                                                                    \
    } while (0)

static std::string writeFile(const std::string& path, const std::string& text) {
    std::ofstream(path, std::ios::binary) << text;
    return path;
}

static void testSha256() {
    const std::string dir = std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp";
    CHECK(sha256OfFile(writeFile(dir + "/flowforce_sha_empty", "")) ==
              "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "sha256 of empty input");
    CHECK(sha256OfFile(writeFile(dir + "/flowforce_sha_abc", "abc")) ==
              "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "sha256 of 'abc'");
    CHECK(sha256OfFile(writeFile(dir + "/flowforce_sha_448",
                                 "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")) ==
              "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1", "sha256 of the 448-bit vector");
    std::string million(1000000, 'a');
    CHECK(sha256OfFile(writeFile(dir + "/flowforce_sha_million", million)) ==
              "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0", "sha256 of a million 'a'");
    bool threw = false;
    try {
        CompiledPotentialForce force(dir + "/flowforce_sha_abc", "", 0);
    } catch (const OpenMMException&) {
        threw = true;
    }
    CHECK(threw, "zero model particles is refused");
}

static void testContext(const std::string& package) {
    const int n = 4, total = 6;
    System system;
    for (int i = 0; i < total; i++)
        system.addParticle(1.0);
    auto* force = new CompiledPotentialForce(package, "", n, "float64");
    force->setParticles({5, 0, 3, 1});
    system.addForce(force);
    std::vector<Vec3> positions;
    for (int i = 0; i < total; i++)
        positions.push_back(Vec3(0.1 * i, -0.2 + 0.05 * i * i, 0.3 - 0.1 * i));
    VerletIntegrator integrator(0.001);
    Context context(system, integrator, Platform::getPlatformByName("Reference"));
    context.setPositions(positions);
    State state = context.getState(State::Energy | State::Forces);
    double expected = 0;
    for (int p : {5, 0, 3, 1})
        expected += positions[p].dot(positions[p]);
    CHECK(std::fabs(state.getPotentialEnergy() - expected) < 1e-10, "energy of the particle subset");
    for (int i = 0; i < total; i++) {
        const bool covered = i == 5 || i == 0 || i == 3 || i == 1;
        const Vec3 want = covered ? positions[i] * -2.0 : Vec3();
        const Vec3 got = state.getForces()[i];
        CHECK(std::fabs(got[0] - want[0]) + std::fabs(got[1] - want[1]) + std::fabs(got[2] - want[2]) < 1e-10,
              "force on particle " + std::to_string(i));
    }

    // The XML holds the path and hash, never the program; a round trip gives the same energy.
    std::stringstream xml;
    XmlSerializer::serialize<System>(&system, "System", xml);
    CHECK(xml.str().find("CompiledPotentialForce") != std::string::npos, "force type in the XML");
    std::stringstream in(xml.str());
    System* copy = XmlSerializer::deserialize<System>(in);
    VerletIntegrator integrator2(0.001);
    Context context2(*copy, integrator2, Platform::getPlatformByName("Reference"));
    context2.setPositions(positions);
    CHECK(std::fabs(context2.getState(State::Energy).getPotentialEnergy() - expected) < 1e-10,
          "energy after the XML round trip");
    delete copy;

    // A hash that does not match the file is refused when the Context is created.
    System wrong;
    for (int i = 0; i < n; i++)
        wrong.addParticle(1.0);
    wrong.addForce(new CompiledPotentialForce(package, std::string(64, '0'), n, "float64"));
    bool refused = false;
    try {
        VerletIntegrator integrator3(0.001);
        Context context3(wrong, integrator3, Platform::getPlatformByName("Reference"));
    } catch (const OpenMMException& error) {
        refused = std::string(error.what()).find("has changed") != std::string::npos;
    }
    CHECK(refused, "a package whose hash does not match is refused");
}

int main(int argc, char* argv[]) {
    try {
        testSha256();
        const char* package = argc > 1 ? argv[1] : std::getenv("FLOWFORCE_TEST_PACKAGE");
        if (package != nullptr && package[0] != '\0')
            testContext(package);
        else
            std::cout << "no toy package given (argument or FLOWFORCE_TEST_PACKAGE): Context tests skipped\n";
    } catch (const std::exception& error) {
        std::cerr << "FAIL: exception " << error.what() << "\n";
        return 1;
    }
    if (failures == 0)
        std::cout << "TestCompiledPotentialForce: all checks passed\n";
    return failures == 0 ? 0 : 1;
}
