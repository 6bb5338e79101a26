// The render farm's job: a small scene POV-Ray renders in seconds per band.
// Frames differ by POV-Ray's clock (+K): the flake turns, the ring of balls moves on.
#version 3.7;
global_settings { assumed_gamma 1.0 }
camera { location <0, 2.2, -6> look_at <0, 0.8, 0> angle 48 }
light_source { <-6, 9, -7> color rgb 1.2 }
light_source { <5, 4, -3> color rgb 0.5 }
sky_sphere { pigment { gradient y color_map { [0 color rgb <0.55, 0.7, 1>] [1 color rgb <0.1, 0.2, 0.55>] } } }
plane { y, 0 pigment { checker color rgb 0.9 color rgb <0.15, 0.3, 0.6> scale 0.8 } finish { reflection 0.25 } }
#declare Flake = union {
  #declare I = 0;
  #while (I < 6)
    cylinder { 0, <0, 1, 0>, 0.08 rotate z * I * 60 }
    sphere { <0, 0.7, 0>, 0.14 rotate z * I * 60 }
    #declare I = I + 1;
  #end
  pigment { color rgb <0.95, 0.97, 1> } finish { phong 0.9 reflection 0.2 }
}
object { Flake rotate z * clock * 30 scale 1.1 translate <0, 1.4, 0> }
#declare K = 0;
#while (K < 8)
  #declare A = (K + clock) * pi / 4;
  sphere { <2.6 * cos(A), 0.35, 2.6 * sin(A) + 1>, 0.35
    pigment { color rgb <0.5 + 0.5 * cos(K), 0.5 + 0.5 * sin(K), 0.8> }
    finish { phong 0.7 reflection 0.35 } }
  #declare K = K + 1;
#end
